"""The three processes of tests/test_multihost.py's training check, launched together beside
the suite (tests/background.py): `python tests/multihost_runs.py DIR` writes DIR/runs.json,
{"single" | "p0" | "p1": {"rc", "out", "err"}}.

"single" is tests/multihost_train.py as 1 process x 8 devices (workdir DIR/one); "p0" and
"p1" are its two processes x 4 devices (gloo collectives on a free local port, workdir
DIR/two). Cluster variables and XLA_FLAGS are removed from their environment (the script sets
the device count). Output goes to files: an unread pipe that fills would block a process inside
a collective.
"""

import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "multihost_train.py")
CLUSTER_VARS = ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST",
                "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "JAX_COORDINATOR_ADDRESS")


def main(folder):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARS + ("XLA_FLAGS",)}
    logs = {n: (open(os.path.join(folder, f"{n}.out"), "w+"),
                open(os.path.join(folder, f"{n}.err"), "w+")) for n in ("single", "p0", "p1")}
    args = {"single": ["single", os.path.join(folder, "one")],
            "p0": ["multi", os.path.join(folder, "two"), "0", str(port)],
            "p1": ["multi", os.path.join(folder, "two"), "1", str(port)]}
    procs = {n: subprocess.Popen([sys.executable, SCRIPT, *a], cwd=ROOT, env=env, text=True,
                                 stdout=logs[n][0], stderr=logs[n][1]) for n, a in args.items()}
    try:
        for p in procs.values():
            p.wait(timeout=600)
    finally:
        for p in procs.values():
            p.kill()
    result = {}
    for n, (out, err) in logs.items():
        out.seek(0), err.seek(0)
        result[n] = {"rc": procs[n].returncode, "out": out.read(), "err": err.read()}
    with open(os.path.join(folder, "runs.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
