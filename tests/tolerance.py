"""Tolerance tables shared by every op test: implementation vs the float32 reference."""

import numpy as np
import jax.numpy as jnp

# (atol, rtol) on outputs / states, and on gradients, relative to the reference's scale.
TOL = {
    "float32": {"out": (2e-4, 2e-4), "grad": (5e-4, 5e-4)},
    "bfloat16": {"out": (3e-2, 3e-2), "grad": (6e-2, 6e-2)},
    # float32 inputs through GPU kernels whose dots run in TF32 (10-bit mantissa, float32
    # accumulation: JAX's and Triton's default for float32 matmuls on NVIDIA GPUs).
    "tfloat32": {"out": (5e-3, 5e-3), "grad": (1e-2, 1e-2)},
}


def assert_close(actual, expected, dtype, kind="out", name=""):
    """Compare with atol scaled by the reference's max magnitude, so tolerances are relative."""
    atol, rtol = TOL[jnp.dtype(dtype).name][kind]
    a = np.asarray(jnp.asarray(actual, jnp.float32))
    e = np.asarray(jnp.asarray(expected, jnp.float32))
    assert a.shape == e.shape, f"{name}: shape {a.shape} != {e.shape}"
    assert np.all(np.isfinite(a)), f"{name}: non-finite values"
    scale = max(1.0, float(np.max(np.abs(e))) if e.size else 1.0)
    np.testing.assert_allclose(a, e, atol=atol * scale, rtol=rtol, err_msg=name)
