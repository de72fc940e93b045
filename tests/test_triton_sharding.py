"""The Triton kernels under a sharded jit: per (batch, head) shard inside shard_map, in Triton's
interpreter on 8 simulated CPU devices (tests/sharded_kernels.py, with TRITON_INTERPRET=1).

Runs in the gpu-check venv; skips where triton is not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pallas_kernels.common import triton_call

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [
    pytest.mark.skipif(triton_call.missing() is not None,
                       reason=f"needs the gpu-check extra: {triton_call.missing()}"),
    pytest.mark.skipif(triton_call.interpreter_on(),       # it starts its own interpreter process
                       reason="runs from the process without the interpreter"),
]


def test_triton_kernels_run_per_shard_and_equal_one_device():
    env = {**os.environ, "PYTHONPATH": ROOT, "TRITON_INTERPRET": "1", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "sharded_kernels.py"), "triton"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    errors = json.loads(out.stdout.strip().splitlines()[-1])
    triton = {k: v for k, v in errors.items() if k.endswith("/triton")}
    assert set(errors) == {"simple_gla/triton", "gated_delta_rule/triton", "titans/triton"}
    assert max(triton.values()) < 1e-3, triton
