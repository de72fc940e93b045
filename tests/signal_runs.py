"""The signal sequence of tests/test_run_safety.py as a script, run beside the suite
(tests/background.py): `python tests/signal_runs.py DIR` writes DIR/signals.json.

In DIR: "straight" trains the CLI's tiny LM (below) for 40 steps; "run" is the same command
started four times: SIGINT after 3 logged steps, SIGTERM after 3, two SIGINTs after 2, then
to the end. The JSON holds both workdirs, and per run of "run" its exit code, stdout, stderr
and the checkpoint steps on disk after it; the test asserts on them.

All five runs share compiled programs through JAX's persistent cache in DIR/jit: they compile
the same train and eval steps, and only the first need compile them.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A run slow enough (~50 ms a step on 2 cores) that a signal lands mid-run.
OVERRIDES = dict(model=dict(d_model=64, n_layers=2, num_heads=2),
                 data=dict(seq_len=128, max_bytes=400_000),
                 train=dict(steps=40, batch_size=16, warmup_steps=4, log_every=1, eval_batches=1),
                 checkpoint=dict(every=1000))


def cli_args(workdir):
    args = ["-m", "train", "--config", os.path.join(ROOT, "configs", "lm.py") + ":size=tiny",
            "--workdir", workdir]
    for section, fields in OVERRIDES.items():
        args += [f"--config.{section}.{k}={v}" for k, v in fields.items()]
    return args


def run_and_signal(workdir, signals, after_step, env):
    """Start the CLI, send `signals` once it has printed `after_step` steps; (rc, out, err)."""
    proc = subprocess.Popen([sys.executable, *cli_args(workdir)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    lines, seen = [], 0
    for line in proc.stdout:
        lines.append(line)
        if re.match(r"step\s+(\d+)/", line):
            seen += 1
            if seen == after_step:
                for s in signals:
                    proc.send_signal(s)
                    time.sleep(0.01)
                break
    out, err = proc.communicate(timeout=300)
    return proc.returncode, "".join(lines) + out, err


def checkpoint_steps(workdir):
    ckpts = os.path.join(workdir, "checkpoints")
    return sorted(int(s) for s in os.listdir(ckpts) if s.isdigit()) if os.path.isdir(ckpts) else []


def main(folder):
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": os.path.join(folder, "jit"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    straight, run = os.path.join(folder, "straight"), os.path.join(folder, "run")
    done = subprocess.run([sys.executable, *cli_args(straight)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)
    result = {"straight": straight, "straight_rc": done.returncode,
              "straight_err": done.stderr[-2000:], "run": run, "runs": []}
    for signals, after in (([signal.SIGINT], 3), ([signal.SIGTERM], 3),
                           ([signal.SIGINT, signal.SIGINT], 2), ([], None)):
        if signals:
            rc, out, err = run_and_signal(run, signals, after, env)
        else:
            p = subprocess.run([sys.executable, *cli_args(run)], cwd=ROOT, capture_output=True,
                               text=True, timeout=300, env=env)
            rc, out, err = p.returncode, p.stdout, p.stderr
        result["runs"].append({"rc": rc, "out": out, "err": err,
                               "checkpoints": checkpoint_steps(run)})
    with open(os.path.join(folder, "signals.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
