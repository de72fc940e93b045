"""ml-collections config files: each defines `get_config(arg)`; every field is overridable from
the command line (`--config.train.steps=200`)."""
