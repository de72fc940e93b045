"""Sweep configs for `scripts/ablate.py`: each `get_config("preset=cpu|gpu|tpu")` returns the
cells (layer lists), seeds and the shared MQAR / LM training recipes (`train/sweep.py`)."""
