"""Benchmark cases for the Titans memory op: chunked vs the token reference, plus the
linear-memory Pallas kernel of the backend ("triton" on a GPU, "mosaic_tpu" on a TPU)
(run them with `python scripts/bench_kernels.py --ops titans`).

``cases()`` returns one dict per (impl, T, memory): ``{"op": "titans", "impl", "T", "H", "D",
"memory": "linear" | "mlp2", "fwd", "fwd_bwd", "lower"}`` where ``fwd`` / ``fwd_bwd`` run a jitted
computation on prebuilt inputs and block until it is done, and ``lower()`` returns the lowered
fwd+bwd program (inputs as arguments) for ``scripts/bench_kernels.py``'s peak-memory column.
Shapes: B=1, H=4, Dk=Dv=Dh=64, block size 16, T in (1024, 4096), float32.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

from pallas_kernels.titans import titans

B, H, D, BLOCK = 1, 4, 64, 16
LENGTHS = (1024, 4096)
MEMORIES = ("linear", "mlp2")
IMPLS = ("chunked", "reference")


def make_inputs(t: int, memory: str, seed: int = 0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    q = jax.random.normal(ks[0], (B, t, H, D)) / D ** 0.5  # [B, T, H, D]
    k = jax.random.normal(ks[1], (B, t, H, D)) / D ** 0.5
    v = jax.random.normal(ks[2], (B, t, H, D))
    theta = 0.05 * jax.nn.sigmoid(jax.random.normal(ks[3], (B, t, H)))  # [B, T, H]
    eta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, t, H)) + 2.0)
    alpha = 0.05 * jax.nn.sigmoid(jax.random.normal(ks[5], (B, t, H)))
    if memory == "linear":
        mem0 = {"w": jax.random.normal(ks[6], (H, D, D)) / D ** 0.5}
    else:
        mem0 = {"w0": jax.random.normal(ks[6], (H, D, D)) / D ** 0.5,
                "w1": jax.random.normal(ks[7], (H, D, D)) / D ** 0.5}
    return (q, k, v, theta, eta, alpha), mem0


def _case(impl: str, t: int, memory: str) -> dict:
    args, mem0 = make_inputs(t, memory)
    cot = jax.random.normal(jax.random.PRNGKey(1), args[2].shape)

    def forward(args, mem0):
        y, _ = titans(*args, mem0, block_size=BLOCK, impl=impl)
        return y

    fwd_jit = jax.jit(forward)
    grad_jit = jax.jit(jax.grad(lambda a, m, c: jnp.sum(forward(a, m) * c), argnums=(0, 1)))

    def fwd():
        return jax.block_until_ready(fwd_jit(args, mem0))

    def fwd_bwd():
        return jax.block_until_ready(grad_jit(args, mem0, cot))

    def lower():  # for peak memory: the fwd+bwd program with the inputs as arguments
        return grad_jit.lower(args, mem0, cot)

    return {"op": "titans", "impl": impl, "T": t, "H": H, "D": D, "memory": memory, "fwd": fwd,
            "fwd_bwd": fwd_bwd, "lower": lower}


_KERNEL_BY_BACKEND = {"gpu": "triton", "tpu": "mosaic_tpu"}


def cases() -> list[dict]:
    """Chunked and reference, T in (1024, 4096), linear and 2-layer MLP memory, block 16; the
    backend's kernel for linear memory."""
    out = [_case(impl, t, memory) for t in LENGTHS for memory in MEMORIES for impl in IMPLS]
    kernel = _KERNEL_BY_BACKEND.get(jax.default_backend())
    if kernel:
        out += [_case(kernel, t, "linear") for t in LENGTHS]
    return out
