"""One process of a 2-process CPU run (gloo collectives): `python multihost_interrupt.py PID
PORT WORKDIR`. Trains a tiny model through `train_and_evaluate`; the test signals one process
and checks that both stop at the same step with one checkpoint. Prints `STOPPED <step> <rc>`."""

import faulthandler
import os
import re
import signal
import sys

faulthandler.register(signal.SIGUSR1)  # `kill -USR1` prints where a hung process waits

pid, port, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train.distributed import initialize  # noqa: E402

initialize(f"127.0.0.1:{port}", 2, pid)  # gloo collectives between the CPU processes

from tests.train_utils import tiny_config  # noqa: E402
from train import train_and_evaluate  # noqa: E402
from train.interrupt import Interrupted  # noqa: E402

cfg = tiny_config(steps=400, log_every=1)
cfg.checkpoint.every = 1000
try:
    train_and_evaluate(cfg, workdir)
    print("FINISHED", flush=True)
except Interrupted as e:
    step = re.search(r"at step (\d+)/", str(e)).group(1)
    print(f"STOPPED {step} {e.exit_code}", flush=True)
