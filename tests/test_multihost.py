"""Multi-process runs: 2 processes x 4 CPU devices (gloo) train like 1 process x 8 devices;
the mesh check; `train.distributed.initialize`'s argument errors; workdirs through epath."""

import ast
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from etils import epath

from tests import background
from tests.multihost_runs import CLUSTER_VARS as _CLUSTER_VARS
from train.distributed import check_batch_axes, detected_cluster, initialize
from train.metrics import MetricsWriter
from zoo.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _result(out: str, err: str) -> dict:
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    assert lines, err[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


# The three training processes, launched beside the suite (tests/background.py).
RUNS = background.job("multihost_runs", ["tests/multihost_runs.py", "{dir}"], timeout=900)
BACKGROUND_JOBS = {"multihost_runs": [RUNS]}


@pytest.fixture
def multihost_runs():
    """tests/multihost_runs.py's {"single" | "p0" | "p1": {"rc", "out", "err"}}."""
    rc, _, err = RUNS.wait()
    assert rc == 0, err[-3000:]
    with open(RUNS.path("runs.json")) as f:
        return json.load(f)


def test_two_processes_train_evaluate_and_resume_like_one(multihost_runs):
    """A (2, 2, 2) mesh over 2 processes x 4 devices: the same loss at every logged step, the
    same eval_loss and eval_tokens as 1 process x 8 devices; a mesh with fewer batch shards
    than processes is refused; deleting the last checkpoint, the 2-process run resumes from the
    one before and logs the same losses again. Both runs take the workdir as an epath.Path
    with os.path & co. forbidden on it (multihost_train.py)."""
    runs = multihost_runs
    assert all(r["rc"] == 0 for r in runs.values()), {n: r["err"][-3000:]
                                                        for n, r in runs.items()}
    text = {n: (r["out"], r["err"]) for n, r in runs.items()}
    one, two = _result(*text["single"]), _result(*text["p0"])
    assert (one["processes"], one["devices"], two["processes"], two["devices"]) == (1, 8, 2, 8)
    assert sorted(two["losses"]) == sorted(one["losses"]) == ["1", "2", "3", "4"]
    np.testing.assert_allclose([two["losses"][s] for s in "1234"],
                               [one["losses"][s] for s in "1234"], rtol=0, atol=1e-5)
    assert two["eval_tokens"] == one["eval_tokens"] > 0
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], abs=1e-5)
    assert "mesh: data*fsdp = 1*1 = 1 batch shards" in two["refused"]
    assert "make mesh.data*mesh.fsdp a multiple of 2" in two["refused"]
    # Resumed from step 2 (checkpoint 4 deleted): steps 3 and 4 again, the same values.
    assert two["checkpoints"] == [2, 4]
    assert two["resumed_first_loss"] == pytest.approx(two["losses"]["3"], abs=1e-6)
    np.testing.assert_allclose([two["resumed_losses"][s] for s in "1234"],
                               [two["losses"][s] for s in "1234"], rtol=0, atol=1e-6)
    assert two["resumed_eval_loss"] == pytest.approx(two["eval_loss"], abs=1e-6)
    assert "resumed from step 2" in text["p0"][0]


# ----------------------------------------------------------------------------- mesh check


def _devices(processes, shape):
    """Fake devices in mesh order: processes[i] is the process of the i-th device."""
    devs = [types.SimpleNamespace(id=i, process_index=p) for i, p in enumerate(processes)]
    return np.array(devs, dtype=object).reshape(shape)


def test_mesh_check_accepts_tensor_groups_within_a_process():
    check_batch_axes(_devices([0] * 4 + [1] * 4, (2, 2, 2)), 2)
    check_batch_axes(_devices([0] * 4 + [1] * 4, (1, 2, 4)), 2)
    # batch shards of a process need not be contiguous (TPU device orders interleave hosts)
    check_batch_axes(_devices([0, 0, 1, 1, 0, 0, 1, 1], (4, 1, 2)), 2)
    check_batch_axes(_devices([0] * 8, (1, 1, 8)), 1)


def test_mesh_check_refuses_shared_or_unequal_batch_shards():
    with pytest.raises(ConfigError, match=r"mesh: data\*fsdp = 1\*1 = 1 batch shards do not "
                                          r"divide among the 2 processes"):
        check_batch_axes(_devices([0] * 4 + [1] * 4, (1, 1, 8)), 2)
    with pytest.raises(ConfigError, match=r"mesh: the mesh.tensor=2 devices of batch shard 0 "
                                          r"lie on processes \[0, 1\]; a tensor group must"):
        check_batch_axes(_devices([0, 1, 0, 1, 0, 1, 0, 1], (4, 1, 2)), 2)
    with pytest.raises(ConfigError, match=r"processes hold unequal numbers of batch shards "
                                          r"\{0: 3, 1: 1\}"):
        check_batch_axes(_devices([0] * 6 + [1] * 2, (2, 2, 2)), 2)


# ----------------------------------------------------------------------------- initialize


@pytest.fixture
def no_cluster(monkeypatch):
    for k in _CLUSTER_VARS:
        monkeypatch.delenv(k, raising=False)


@pytest.mark.parametrize("kwargs, message", [
    (dict(process_id=1), r"--process_id 1 needs --num_processes"),
    (dict(num_processes=2, process_id=2), r"--process_id: must lie in \[0, 2\) for "
                                          r"--num_processes 2, got 2"),
    (dict(num_processes=0), r"--num_processes: must be a positive integer, got 0"),
    (dict(coordinator="10.0.0.1"), r"--coordinator_address: expected host:port"),
    (dict(num_processes=2, process_id=0), r"needs --coordinator_address, --num_processes and "
                                          r"--process_id on every process; missing: "
                                          r"--coordinator_address$"),
    (dict(coordinator="10.0.0.1:1234"), r"missing: --num_processes, --process_id$"),
])
def test_initialize_refuses_inconsistent_arguments(no_cluster, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        initialize(**kwargs)


def test_initialize_without_a_cluster_or_flags_is_one_process(no_cluster):
    assert initialize() == "one process"
    assert initialize(num_processes=1, process_id=0) == "one process"
    assert initialize(coordinator="10.0.0.1:1234", num_processes=1) == "one process"


def test_slurm_is_detected_from_its_environment(no_cluster, monkeypatch):
    assert detected_cluster() is None
    for k, v in dict(SLURM_JOB_ID="7", SLURM_STEP_NODELIST="node[1-2]", SLURM_NTASKS="2",
                     SLURM_PROCID="1", SLURM_LOCALID="0").items():
        monkeypatch.setenv(k, v)
    assert detected_cluster() == "SlurmCluster"


def test_cli_reports_an_inconsistent_flag_in_one_line():
    env = {k: v for k, v in os.environ.items() if k not in _CLUSTER_VARS}
    out = subprocess.run([sys.executable, "-m", "train", "--process_id", "1"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (
        "error: --process_id 1 needs --num_processes (the number of processes in the job)")


# ----------------------------------------------------------------------------- workdir paths

_FS_CALLS = {"os.path.abspath", "os.path.join", "os.path.exists", "os.path.isdir",
             "os.path.isfile", "os.path.dirname", "os.path.getsize", "os.makedirs",
             "os.replace", "os.rename", "os.listdir", "os.remove", "shutil.rmtree", "open"}
# The sweep tools keep their jobs under a local sweep root (not a run's workdir).
_LOCAL_ONLY = {"sweep.py", "sweep_jobs.py", "sweep_report.py"}


def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _mentions(node, tainted: set) -> bool:
    for n in ast.walk(node):
        name = _dotted(n) if isinstance(n, (ast.Name, ast.Attribute)) else ""
        if name and ("workdir" in name.lower() or name in tainted):
            return True
    return False


def workdir_fs_calls(source: str) -> list[str]:
    """`os.path.*` / `os.makedirs` / `open` ... calls whose argument derives from a workdir:
    a name holding "workdir", or assigned (in the same function; `self.x` in the module) from
    an expression that does, or a parameter that a call passes such a value to."""
    tree = ast.parse(source)
    funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    local = {f: set() for f in funcs}      # tainted names per function
    shared: set = set()                     # tainted self.attributes
    params = {f.name: [a.arg for a in f.args.args] for f in funcs}
    changed = True
    while changed:
        changed = False
        for f in funcs:
            names = local[f] | shared
            for n in ast.walk(f):
                targets = []
                if isinstance(n, ast.Assign) and _mentions(n.value, names):
                    targets = n.targets
                elif isinstance(n, (ast.With,)):
                    targets = [i.optional_vars for i in n.items
                               if i.optional_vars is not None and _mentions(i.context_expr, names)]
                elif isinstance(n, ast.Call) and _dotted(n.func).split(".")[-1] in params:
                    p = params[_dotted(n.func).split(".")[-1]]
                    p = p[1:] if p and p[0] == "self" else p
                    hits = [p[i] for i, a in enumerate(n.args[:len(p)]) if _mentions(a, names)]
                    for g in funcs:
                        if g.name == _dotted(n.func).split(".")[-1] and not set(hits) <= local[g]:
                            local[g] |= set(hits)
                            changed = True
                for t in targets:
                    for leaf in ast.walk(t):
                        name = _dotted(leaf) if isinstance(leaf, (ast.Name, ast.Attribute)) else ""
                        pool = shared if name.startswith("self.") else local[f]
                        if name and name not in pool:
                            pool.add(name)
                            changed = True
    bad = []
    for f in funcs:
        for n in ast.walk(f):
            if isinstance(n, ast.Call) and _dotted(n.func) in _FS_CALLS and any(
                    _mentions(a, local[f] | shared) for a in n.args):
                bad.append(f"{f.name}:{n.lineno}: {ast.unparse(n)}")
    return bad


def test_no_os_path_on_a_workdir_in_train():
    found = {}
    for name in sorted(os.listdir(os.path.join(ROOT, "train"))):
        if name.endswith(".py") and name not in _LOCAL_ONLY:
            with open(os.path.join(ROOT, "train", name)) as f:
                calls = workdir_fs_calls(f.read())
            if calls:
                found[name] = calls
    assert found == {}


def test_the_workdir_check_finds_os_path_uses():
    """The checker flags the forms the trainer used before epath (so the test above bites)."""
    before = '''
class Checkpointer:
    def __init__(self, workdir):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    def load(self, ref):
        path = os.path.join(self.directory, ref["file"])
        with open(path, "rb") as f:
            return f.read()
def run(workdir):
    out = workdir + "/eval"
    _write(out, 1)
def _write(target, value):
    os.makedirs(target, exist_ok=True)
def local(cfg):
    return open(cfg.path)
'''
    assert sorted(c.split(":")[0] for c in workdir_fs_calls(before)) == [
        "__init__", "__init__", "_write", "load", "load"]


def test_metrics_writer_on_an_epath_workdir(tmp_path):
    """Rows written, found, and cut back to the resumed step; the rewrite is atomic."""
    wd = epath.Path(tmp_path) / "run"
    w = MetricsWriter(wd)
    for step in (1, 2, 3):
        w.write(step, {"loss": 1.0 / step})
    w.write(3, {"eval_loss": 0.5})
    w.close()
    assert MetricsWriter(wd, resume_step=10 ** 9).find(3, "eval_loss") == {"step": 3,
                                                                           "eval_loss": 0.5}
    w = MetricsWriter(wd, resume_step=2)
    w.write(3, {"loss": 9.0})
    w.close()
    rows = [json.loads(ln) for ln in (wd / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 9.0}]
    assert sorted(p.name for p in wd.iterdir()) == ["metrics.jsonl", "tb"]


def test_a_one_task_slurm_job_starts_nothing(no_cluster, monkeypatch):
    """`srun python -m train` on one node: jax.distributed would restrict the process to
    device SLURM_LOCALID; one task needs no coordinator, so nothing is started."""
    for k, v in dict(SLURM_JOB_ID="7", SLURM_STEP_NODELIST="node1", SLURM_NTASKS="1",
                     SLURM_PROCID="0", SLURM_LOCALID="0").items():
        monkeypatch.setenv(k, v)
    assert initialize() == "one process"
    monkeypatch.setenv("SLURM_NTASKS", "2")  # a 2-task job, opted out by --num_processes 1
    assert initialize(num_processes=1) == "one process"


@pytest.fixture
def fake_gcs(monkeypatch):
    """gs:// served from memory: fsspec's "gs"/"gcs" protocols -> a MemoryFileSystem, which
    is what epath (without TensorFlow) and TensorBoard reach a bucket through. (Orbax's own
    GCS client, google-cloud-storage / tensorstore, is not covered: checkpoints need a bucket.)"""
    import importlib

    from etils.epath import backend
    from fsspec.implementations.memory import MemoryFileSystem

    class FakeGCS(MemoryFileSystem):
        protocol = ("gs", "gcs")
        store, pseudo_dirs = {}, [""]

    registry = importlib.import_module("fsspec.registry")._registry
    for name in FakeGCS.protocol:
        monkeypatch.setitem(registry, name, FakeGCS)
    backend.fsspec_backend._get_filesystem.cache_clear()  # epath caches its filesystems
    yield FakeGCS.store
    backend.fsspec_backend._get_filesystem.cache_clear()


def test_metrics_and_eval_results_on_a_gs_workdir(fake_gcs, capsys):
    """metrics.jsonl (rewritten whole: an object cannot be appended to), the TensorBoard
    events and the eval results file land in the bucket, under the URI as given."""
    from train.eval import _report
    w = MetricsWriter("gs://bucket/run")
    for step in (1, 2):
        w.write(step, {"loss": 1.0 / step})
    w.close()
    w = MetricsWriter("gs://bucket/run", resume_step=1)
    w.write(2, {"loss": 7.0})
    w.close()
    path = epath.Path("gs://bucket/run") / "eval" / "step_2.json"
    _report(path, 2, {"ppl": {"eval_loss": 1.5}}, {"sources": {"ppl": "heldout"}})
    assert "wrote gs://bucket/run/eval/step_2.json" in capsys.readouterr().out
    rows = [json.loads(ln) for ln in (epath.Path("gs://bucket/run") / "metrics.jsonl")
            .read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 7.0}]
    assert json.loads(path.read_text()) == {"step": 2, "ppl": {"eval_loss": 1.5},
                                            "sources": {"ppl": "heldout"}}
    keys = sorted(k.split("/run/")[1].split("/events.out")[0] for k in fake_gcs)
    assert keys == ["eval/scalars.jsonl", "eval/step_2.json", "eval/tb", "metrics.jsonl",
                    "tb", "tb"]
