"""The command-line scripts in scripts/: a complete --help, and argparse's one-line error on a
bad value.

Each script runs in a subprocess, as a user would run it; `--help` and argument errors exit before
any model or kernel is built, so these checks take about a second per run.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")
# A script with a command line has a __main__ guard.
CLI_SCRIPTS = sorted(name for name in os.listdir(SCRIPTS) if name.endswith(".py")
                     and 'if __name__ == "__main__":' in open(os.path.join(SCRIPTS, name)).read())


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="80", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, os.path.join(SCRIPTS, script), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


def _blocks(text: str) -> list[str]:
    return [b for b in re.split(r"\n\s*\n", text.strip()) if b.strip()]


def _options(help_text: str) -> dict[str, str]:
    """{invocation: help} for each entry of the `options:` section."""
    section = help_text.split("\noptions:\n", 1)[1]
    section = re.split(r"\n\S", section, maxsplit=1)[0]  # up to the epilog
    entries: dict[str, str] = {}
    current = None
    for line in section.splitlines():
        if re.match(r"^  -", line):
            invocation, _, rest = line.strip().partition("  ")
            current = invocation
            entries[current] = rest.strip()
        elif current is not None and line.strip():
            entries[current] = (entries[current] + " " + line.strip()).strip()
    return entries


def test_every_cli_script_is_found():
    assert {"bench_kernels.py", "ablate.py"} <= set(CLI_SCRIPTS)


@pytest.mark.parametrize("script", CLI_SCRIPTS)
def test_help_is_complete(script):
    r = _run(script, "--help")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    blocks = _blocks(out)
    assert blocks[0].startswith("usage:")
    options_at = next(i for i, b in enumerate(blocks) if b.startswith("options:"))
    description = "\n".join(blocks[1:options_at])
    first_line = description.splitlines()[0]
    assert re.search(r"\bwrites?\b", first_line), f"does not say what it writes: {first_line!r}"
    assert description.rstrip().endswith("."), f"ends mid-sentence: {description[-80:]!r}"
    options = _options(out)
    assert len(options) > 1
    for invocation, text in options.items():
        if invocation.startswith("-h, --help"):
            continue
        assert "(default:" in text, f"{script} {invocation}: default not shown"
        assert re.sub(r"\(default:.*\)$", "", text).strip(), f"{script} {invocation}: no help text"
    epilog = out.split("\nexamples:\n", 1)
    assert len(epilog) == 2 and f"python scripts/{script}" in epilog[1], "no example commands"


@pytest.mark.parametrize("script, args, option", [
    ("bench_kernels.py", ["--ops", "simple_gla,nope"], "--ops"),
    ("bench_kernels.py", ["--impls", "trition"], "--impls"),
    ("bench_kernels.py", ["--T", "0"], "--T"),
    ("bench_kernels.py", ["--clock", "sundial"], "--clock"),
    ("ablate.py", ["--config", "c.py", "--workdir", "w", "--shard", "3/2"], "--shard"),
    ("ablate.py", ["--config", "c.py", "--workdir", "w", "--shard", "x"], "--shard"),
])
def test_a_bad_value_is_a_one_line_error(script, args, option):
    r = _run(script, *args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    errors = [line for line in lines if "error:" in line]
    assert errors == [lines[-1]], r.stderr
    assert f"error: argument {option}" in lines[-1]


def _load(name: str):
    path = os.path.join(SCRIPTS, f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_scripts_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_kernels_cases_come_from_the_registry(monkeypatch):
    """bench_kernels.py takes its ops, implementation names and lengths from the op registry
    (each op's BenchSpec): every op with a BenchSpec is offered, every implementation and peer
    name is accepted, the help states each op's lengths, and a case builds (traced, not run)
    for each implementation available on CPU."""
    from pallas_kernels.common.frame import registered_ops

    monkeypatch.setattr(sys, "path", list(sys.path))  # bench_kernels.py prepends to sys.path
    bench = _load("bench_kernels")
    ops = {name: op for name, op in registered_ops().items() if op.bench is not None}
    assert {"simple_gla", "gated_delta_rule", "titans"} <= set(bench._benched_ops()) == set(ops)
    names = set(bench._impl_names(ops))
    for op in ops.values():
        assert set(op.bench.impls) | set(op.bench.peer) <= names
    help_text = " ".join(bench.build_parser().format_help().split())
    for name, op in ops.items():
        assert f"{name} {', '.join(map(str, op.bench.lengths))}" in help_text
    cases = bench._load_cases(ops["titans"], {1024}, {"chunked", "reference", "mosaic_tpu"},
                              "cpu")
    assert sorted((c["impl"], c["memory"]) for c in cases) == [
        ("chunked", "linear"), ("chunked", "mlp2"), ("reference", "linear"),
        ("reference", "mlp2")]                         # no TPU kernel on the CPU backend
    assert all(c["T"] == 1024 and (c["B"], c["H"], c["D"]) == (1, 4, 64) for c in cases)
