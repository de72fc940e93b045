"""Softmax attention: every implementation against the reference, and the layer's cache."""

import functools
import json
import os
import subprocess
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layers.attention import Attention
from pallas_kernels.attention import attention
from pallas_kernels.attention import blocked as blocked_lib
from pallas_kernels.attention import gpu
from pallas_kernels.attention.gpu import segment_offsets
from pallas_kernels.attention.memory import fwd_bwd_memory
from pallas_kernels.attention.tpu import attention_splash
from tests.offload import offload
from tests.op_suite import TARGETS, segments
from tests.tolerance import assert_close


def _normal(shape, dtype=jnp.float32, seed=0):
    """Standard normal from numpy (eager jax.random compiles one program per call)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32), dtype)


def _qkv(b, t, hq, hkv, d, dtype, seed=0):
    return _qkv_dv(b, t, t, hq, hkv, d, d, dtype, seed)


def _qkv_dv(b, tq, tk, hq, hkv, d, dv, dtype, seed=0):
    return (_normal((b, tq, hq, d), dtype, 3 * seed), _normal((b, tk, hkv, d), dtype, 3 * seed + 1),
            _normal((b, tk, hkv, dv), dtype, 3 * seed + 2))


def _naive(q, k, v, seg, window):
    """Loop-based softmax attention in numpy float64 (an independent oracle)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, hq, d = q.shape
    g = hq // k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for h in range(hq):
            for i in range(t):
                if seg[bi, i] == 0:
                    continue
                js = [j for j in range(i + 1) if seg[bi, j] == seg[bi, i]
                      and (window is None or i - j < window)]
                s = np.array([q[bi, i, h] @ k[bi, j, h // g] for j in js]) / np.sqrt(d)
                p = np.exp(s - s.max())
                p /= p.sum()
                out[bi, i, h] = sum(pj * v[bi, j, h // g] for pj, j in zip(p, js))
    return out


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("window", [None, 3])
def test_op_matches_naive_and_reference(dtype, window):
    q, k, v = _qkv(2, 11, 4, 2, 8, dtype)
    seg = np.array([[1] * 6 + [2] * 3 + [0] * 2, [1] * 11], np.int32)
    want = _naive(q, k, v, seg, window)
    for impl in ("reference", "xla"):
        got = attention(q, k, v, segment_ids=jnp.asarray(seg), window=window, impl=impl)
        assert got.dtype == dtype
        assert_close(got, want, dtype, name=f"{impl} window={window}")
    assert np.all(np.asarray(got[0, -2:], np.float32) == 0), "padding rows must output 0"
    plain = attention(q, k, v, window=window, impl="xla")
    assert_close(plain, _naive(q, k, v, np.ones((2, 11), np.int32), window), dtype, name="plain")


def test_op_gradients_match_reference():
    q, k, v = _qkv(1, 9, 2, 1, 8, jnp.float32)
    seg = jnp.array([[1] * 5 + [2] * 4])
    ct = jax.random.normal(jax.random.key(3), q.shape)
    grads = {}
    for impl in ("reference", "xla"):
        f = lambda q, k, v: attention(q, k, v, segment_ids=seg, window=4, impl=impl)
        _, vjp = jax.vjp(f, q, k, v)
        grads[impl] = vjp(ct)
    for a, b in zip(grads["xla"], grads["reference"]):
        assert_close(a, b, jnp.float32, kind="grad")


def test_op_bad_input():
    q, k, v = _qkv(1, 4, 3, 2, 8, jnp.float32)
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        attention(q, k, v)
    q, k, v = _qkv(1, 4, 2, 2, 8, jnp.float32)
    with pytest.raises(ValueError, match="k must have shape"):
        attention(q, k[:, :, :, :4], v)
    with pytest.raises(TypeError, match="floating"):
        attention(q.astype(jnp.int32), k, v)
    with pytest.raises(ValueError, match="impl="):
        attention(q, k, v, impl="cuda")
    with pytest.raises(ValueError, match="segment_ids must have shape"):
        attention(q, k, v, segment_ids=jnp.ones((1, 5), jnp.int32))


def _layer(window, dtype=jnp.float32):
    return Attention(32, num_heads=4, num_kv_heads=2, window=window, dtype=dtype, rngs=nnx.Rngs(0))


def test_sliding_window_cache_is_a_ring_of_w_slots():
    """(prefill + decode == forward for every mixer is in test_mixers.py)"""
    assert _layer(3).init_cache(2, 16)["k"].shape[1] == 3
    assert _layer(None).init_cache(2, 16)["k"].shape[1] == 16


@offload
def test_layer_bf16_close_to_fp32():
    x = jax.random.normal(jax.random.key(4), (2, 9, 32))
    m32, m16 = _layer(3), _layer(3, jnp.bfloat16)
    y32, _ = m32(x)
    y16, _ = m16(x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    assert_close(y16, y32, jnp.bfloat16)


def test_kv_sinks_are_visible_to_every_real_query():
    q, k, v = _qkv(1, 6, 2, 2, 8, jnp.float32)
    ks, vs = _qkv(1, 2, 2, 2, 8, jnp.float32, seed=5)[1:]
    seg = jnp.array([[1, 1, 1, 2, 2, 0]])
    kk, vv = jnp.concatenate([ks, k], 1), jnp.concatenate([vs, v], 1)
    kv_pos = jnp.concatenate([jnp.zeros((1, 2), jnp.int32), jnp.arange(6)[None]], 1)
    kv_seg = jnp.concatenate([jnp.ones((1, 2), jnp.int32), seg], 1)
    args = dict(segment_ids=seg, kv_segment_ids=kv_seg, q_positions=jnp.arange(6)[None],
                kv_positions=kv_pos, window=2, kv_sinks=2)
    got = attention(q, kk, vv, impl="xla", **args)
    assert_close(got, attention(q, kk, vv, impl="reference", **args), jnp.float32)
    # Query 4 (document 2, window 2) sees the two sinks and keys 3, 4 only.
    logits = jnp.einsum("hd,khd->hk", q[0, 4], jnp.concatenate([ks[0], k[0, 3:5]])) / 8 ** 0.5
    want = jnp.einsum("hk,khd->hd", jax.nn.softmax(logits, -1), jnp.concatenate([vs[0], v[0, 3:5]]))
    assert_close(got[0, 4], want, jnp.float32)
    assert np.all(np.asarray(got[0, 5]) == 0), "padding queries see no sink"


def test_conv_size_0_is_plain_attention_and_the_conv_only_adds():
    """conv_size = 0 (the default): the parameters, cache and output of plain attention; K > 0
    adds `conv` and nothing else (the projections draw the same initial weights)."""
    x = jax.random.normal(jax.random.key(6), (2, 9, 32))
    plain = Attention(32, num_heads=4, num_kv_heads=2, conv_size=0, rngs=nnx.Rngs(0))
    conv = Attention(32, num_heads=4, num_kv_heads=2, conv_size=4, rngs=nnx.Rngs(0))
    params = lambda m: {"/".join(map(str, p)): v[...] for p, v in
                        nnx.to_flat_state(nnx.state(m, nnx.Param))}
    p0, p4 = params(plain), params(conv)
    assert sorted(p0) == [f"{n}_proj/w" for n in "koqv"]
    assert sorted(p4) == sorted([*p0, "conv/w"])
    for name, w in p0.items():
        np.testing.assert_array_equal(w, p4[name])
    assert set(plain.init_cache(2, 8)) == {"k", "v", "slot_pos", "length"}
    assert conv.init_cache(2, 8)["conv"].shape == (2, 3, 32)
    # Plain: o_proj(attention(RoPE(x W_q), RoPE(x W_k), x W_v)), composed here from the op.
    pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
    q, k, v = plain._project(x, pos)
    want = plain.o_proj(attention(q, k, v, impl="reference").reshape(2, 9, -1))
    assert_close(plain(x)[0], want, jnp.float32)
    # With the conv: plain attention (same projections) of x + conv(x).
    assert_close(conv(x)[0], plain(x + conv.conv(x)[0])[0], jnp.float32)


def test_conv_size_must_be_a_non_negative_int():
    with pytest.raises(ValueError, match="conv_size"):
        Attention(32, num_heads=4, conv_size=-1, rngs=nnx.Rngs(0))


# ------------------------------------------------------------------------------------------
# Memory-efficient paths: "blocked" (every backend), splash ("mosaic_tpu"), cuDNN ("cudnn").


_F32_TOL = 1e-5  # blocked vs reference in float32: same math, reordered sums
# The blocked form's loops take seconds to compile at the default level; numerics are the same.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _close(got, want, dtype, kind="out", name=""):
    if dtype == jnp.float32:
        w = np.asarray(want, np.float32)
        scale = max(1.0, float(np.abs(w).max()))
        np.testing.assert_allclose(np.asarray(got, np.float32), w, atol=_F32_TOL * scale,
                                   rtol=_F32_TOL, err_msg=name)
    else:
        assert_close(got, want, dtype, kind=kind, name=name)


def _vjp_both(f_got, f_want, args, seed=7):
    """(output, input cotangents) of both functions for one random output cotangent, in one
    jitted program."""
    def both(args, ct):
        out = []
        for f in (f_got, f_want):
            o, vjp = jax.vjp(f, *args)
            out.append((o, vjp(ct)))
        return out

    shape = jax.eval_shape(f_want, *args)
    ct = _normal(shape.shape, shape.dtype, seed)
    return _jit(both)(args, ct)


@pytest.mark.parametrize("dtype,window,blocks", [(jnp.float32, None, (8, 16)),
                                                 (jnp.bfloat16, 5, (512, 512))],
                         ids=["float32-blocks8x16", "bfloat16-window5-one-block"])
def test_blocked_matches_reference(dtype, window, blocks):
    """Packing (a reset inside a block, trailing padding), GQA 4:2, Dv != D, T = 37 not a multiple
    of the blocks (8 x 16), or one block (the loop-free form): output and dq, dk, dv."""
    q, k, v = _qkv_dv(2, 37, 37, 4, 2, 8, 6, dtype)
    seg = segments(37, [(1, 10), (2, 20)], [(1, 37)])
    kw = dict(segment_ids=seg, window=window)
    blk = functools.partial(blocked_lib.attention_blocked, block_q=blocks[0], block_kv=blocks[1])
    pos = jnp.broadcast_to(jnp.arange(37), (2, 37))
    f_got = lambda q, k, v: blk(q, k, v, pos, pos, seg, seg, scale=8 ** -0.5, window=window)
    f_want = lambda q, k, v: attention(q, k, v, impl="reference", **kw)
    (o, grads), (o_ref, grads_ref) = _vjp_both(f_got, f_want, (q, k, v))
    assert o.dtype == dtype and all(g.dtype == dtype for g in grads)
    _close(o, o_ref, dtype, name="o")
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        _close(g, g_ref, dtype, kind="grad", name=f"d{name}")
    assert np.all(np.asarray(o[0, 30:], np.float32) == 0), "padding rows must output 0"
    assert np.all(np.asarray(grads[1][0, 30:], np.float32) == 0), "padding keys get no gradient"


def test_blocked_cached_form_with_sinks_and_ring_buffer():
    """Tq != Tk: 2 sinks, a ring buffer of 5 slots in slot order (one empty, -1), then 3 new
    tokens; rows of different lengths (row 1: one new token and padding); window 4."""
    q, k, v = _qkv_dv(2, 3, 10, 4, 2, 8, 8, jnp.float32, seed=1)
    ring = [[7, 8, 4, 5, 6], [2, -1, 0, 1, 3]]  # positions held in the 5 slots
    kv_pos = jnp.array([[0, 0] + ring[0] + [9, 10, 11], [0, 0] + ring[1] + [4, -1, -1]])
    q_pos = jnp.array([[9, 10, 11], [4, 5, 6]])
    q_seg = jnp.array([[1, 1, 1], [1, 0, 0]])
    kv_seg = (kv_pos >= 0).astype(jnp.int32)
    kw = dict(segment_ids=q_seg, kv_segment_ids=kv_seg, q_positions=q_pos, kv_positions=kv_pos,
              window=4, kv_sinks=2)
    f_got = lambda q, k, v: blocked_lib.attention_blocked(
        q, k, v, q_pos, kv_pos, q_seg, kv_seg, scale=8 ** -0.5, window=4, kv_sinks=2,
        block_q=2, block_kv=3)
    f_want = lambda q, k, v: attention(q, k, v, impl="reference", **kw)
    (o, grads), (o_ref, grads_ref) = _vjp_both(f_got, f_want, (q, k, v))
    _close(o, o_ref, jnp.float32, name="o")
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        _close(g, g_ref, jnp.float32, name=f"d{name}")
    assert np.all(np.asarray(o[1, 1:]) == 0)
    # The public op: "auto" and the kernels' names run this form through blocked (same program).
    jaxpr = lambda impl: str(jax.make_jaxpr(lambda q, k, v: attention(q, k, v, impl=impl, **kw))(
        q, k, v))
    assert jaxpr("auto") == jaxpr("blocked") == jaxpr("cudnn") == jaxpr("mosaic_tpu")


def test_blocked_live_block_table():
    """Which (q block, kv block) pairs are visited: causal, window, packing, sinks."""
    def live(seg, window=None, sinks=0, bs=4):
        seg = jnp.asarray(seg, jnp.int32)[None]
        pos = jnp.arange(seg.shape[1])[None]
        rows = lambda x, fill: blocked_lib._row_blocks(x, bs, fill)
        table = blocked_lib._live_blocks(rows(pos, 0), rows(seg, 0), rows(pos, -1),
                                         rows(seg, 0), bs, window, sinks)
        return np.asarray(table).astype(int).tolist()

    ones = [1] * 16
    assert live(ones) == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert live(ones, window=3) == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    assert live(ones, window=3, sinks=1) == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0],
                                             [1, 0, 1, 1]]
    # Documents [0, 6), [6, 12), padding: the second document skips block 0, padding is dead.
    assert live([1] * 6 + [2] * 6 + [0] * 4) == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0],
                                                 [0, 0, 0, 0]]


def test_auto_is_blocked_on_cpu_and_builds_no_dense_mask():
    """Traced only: T = 600 is more than one 512-block, so no [B, T, T] mask may appear."""
    q, k, v = jax.eval_shape(lambda: _qkv(2, 600, 4, 2, 8, jnp.float32))
    seg = segments(600, [(1, 300), (2, 200)], [(1, 600)])
    jaxpr = lambda impl: str(jax.make_jaxpr(
        lambda q, k, v: attention(q, k, v, segment_ids=seg, impl=impl))(q, k, v))
    auto = jaxpr("auto")
    assert auto == jaxpr("blocked")
    assert "bool[2,600,600]" not in auto and "bool[2,600,600]" in jaxpr("reference")


def test_blocked_memory_is_a_fraction_of_dense():
    """Compiled fwd + bwd temporaries at B1 T2048 H2 D64 (T=8192 H16 D128: memory.py's
    docstring): the blocked form holds 512 x 512 tiles, the dense one [H, T, T] scores."""
    kw = dict(B=1, T=2048, H=2, D=64, dtype=jnp.float32)
    blocked, dense = fwd_bwd_memory("blocked", **kw), fwd_bwd_memory("xla", **kw)
    assert blocked["temp_bytes"] * 4 <= dense["temp_bytes"], (blocked, dense)


def test_block_sizes_are_checked():
    q, k, v = _qkv(1, 4, 2, 2, 8, jnp.float32)
    pos = jnp.arange(4)[None]
    with pytest.raises(ValueError, match="block_q must be a positive int"):
        blocked_lib.attention_blocked(q, k, v, pos, pos, pos, pos, scale=1.0, block_q=0)


def test_splash_interpret_matches_reference():
    """Splash attention in Pallas interpret mode: packing with padding, GQA, a window, T = 200
    padded to 256 (forward; its backward is the library's own kernels)."""
    q, k, v = _qkv(2, 200, 4, 2, 64, jnp.float32)
    seg = segments(200, [(1, 50), (2, 130)], [(1, 200)])
    got = jax.jit(lambda q, k, v: attention_splash(q, k, v, seg, scale=0.125, window=33,
                                                   interpret=True))(q, k, v)
    want = attention(q, k, v, segment_ids=seg, window=33, impl="reference")
    _close(got, want, jnp.float32)


@pytest.mark.parametrize("mesh_shape", [(1, 1), (2, 2), (1, 3)],
                         ids=["one-device", "data2-tensor2", "tensor3-falls-back"])
def test_splash_lowers_for_tpu(mesh_shape):
    """Forward + backward of impl="mosaic_tpu" lowered for TPU from CPU (bf16, packing); on a
    2 x 2 abstract mesh the kernels run inside shard_map over batch and heads; 3 tensor shards
    do not divide 4:2 heads, so "blocked" runs instead (no kernel)."""
    platform, kind, device_platform, marker = TARGETS["mosaic_tpu"]
    q, k, v = jax.eval_shape(lambda: _qkv(4, 256, 4, 2, 128, jnp.bfloat16))
    seg = jax.ShapeDtypeStruct((4, 256), jnp.int32)

    def fwd_bwd(q, k, v, seg):
        f = lambda q, k, v: attention(q, k, v, segment_ids=seg, impl="mosaic_tpu")
        return jax.grad(lambda *a: f(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)

    mesh = jax.sharding.AbstractMesh(mesh_shape, ("data", "tensor"),
                                     axis_types=(jax.sharding.AxisType.Auto,) * 2,
                                     abstract_device=jax.sharding.AbstractDevice(
                                         device_kind=kind, num_cores=1, platform=device_platform))
    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(fwd_bwd).trace(q, k, v, seg).lower(lowering_platforms=(platform,)).as_text()
    if mesh_shape == (1, 3):
        assert marker not in text
        return
    assert text.count(marker) >= 3, "forward, dq and dkv kernels"
    if mesh_shape != (1, 1):
        assert "sdy.manual_computation" in text or "shard_map" in text


def test_cudnn_offsets_and_errors_off_gpu():
    seg = segments(8, [(1, 3), (2, 1), (3, 2)], [(5, 8)], [])
    offsets, lengths = jax.jit(segment_offsets, static_argnums=1)(seg, 4)
    assert offsets.tolist() == [[0, 3, 4, -1, -1], [0, -1, -1, -1, -1], [-1] * 5]
    assert lengths.tolist() == [[3, 1, 2, -1], [8, -1, -1, -1], [-1] * 4]
    q, k, v = _qkv(1, 8, 2, 2, 8, jnp.bfloat16)
    with pytest.raises(RuntimeError, match="cudnn' runs on a CUDA GPU only"):
        attention(q, k, v, impl="cudnn")
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        attention(*(x.astype(jnp.float32) for x in (q, k, v)), impl="cudnn")


def test_cudnn_lowers_for_cuda_from_cpu():
    """The packed cuDNN call, forward + backward, lowered for CUDA from CPU. jax probes the cuDNN
    version and the GPU's capability while tracing; the probes are patched to a Hopper with
    cuDNN 9.10 (an abstract GPU mesh does not work: jax 0.11 needs devices for its custom
    partitioning)."""
    mod = gpu.cudnn_entry()
    assert mod is not None, "jax's packed cuDNN entry is missing"
    q, k, v = jax.eval_shape(lambda: _qkv(2, 256, 4, 2, 128, jnp.bfloat16))
    seg = segments(256, [(1, 100), (2, 100)], [(1, 256)])

    def fwd_bwd(q, k, v):
        f = lambda q, k, v: gpu.attention_cudnn(q, k, v, seg, scale=0.1, window=64)
        o, vjp = jax.vjp(f, q, k, v)
        return o, vjp(o)

    with mock.patch.object(mod, "check_cudnn_version", lambda: 91000), \
            mock.patch.object(mod, "check_compute_capability", lambda c: True), \
            mock.patch.object(mod, "is_cuda_compute_capability_equal", lambda c: False), \
            mock.patch.object(gpu.jax, "default_backend", lambda: "gpu"):
        text = jax.jit(fwd_bwd).trace(q, k, v).lower(lowering_platforms=("cuda",)).as_text()
    assert "__cudnn$fmhaSoftmax(" in text and "__cudnn$fmhaSoftmaxBackward(" in text
    config = text.replace("\\22", '"')
    for field in ('"mask_type": "PADDING_CAUSAL"', '"sliding_window_length": 64',
                  '"max_seg_per_batch": 256'):
        assert field in config, field


_SHARDED_BLOCKED = r'''
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, os.getcwd())
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from pallas_kernels.attention import attention

rng = np.random.default_rng(0)
shapes = ((4, 96, 8, 16), (4, 96, 4, 16), (4, 96, 4, 16), (4, 96, 8, 16))
q, k, v, ct = (jnp.asarray(rng.standard_normal(s, np.float32)) for s in shapes)
seg = jnp.asarray(np.repeat([[1] * 40 + [2] * 50 + [0] * 6], 4, 0).astype(np.int32))

def fwd_bwd(q, k, v, ct, seg):
    f = lambda q, k, v: attention(q, k, v, segment_ids=seg, window=33, impl="blocked")
    o, vjp = jax.vjp(f, q, k, v)
    return (o,) + vjp(ct)

want = jax.jit(fwd_bwd)(q, k, v, ct, seg)
mesh = jax.make_mesh((2, 1, 4), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
x, s = NamedSharding(mesh, P("data", None, "tensor", None)), NamedSharding(mesh, P("data", None))
with jax.set_mesh(mesh):
    f = jax.jit(fwd_bwd, in_shardings=(x, x, x, x, s), out_shardings=(x,) * 4)
    compiled = f.lower(q, k, v, ct, seg).compile()
    got = compiled(*(jax.device_put(a, sh) for a, sh in zip((q, k, v, ct, seg), (x,) * 4 + (s,))))
hlo = compiled.as_text()
print(json.dumps({"collectives": sum(hlo.count(c + "(") for c in
                                     ("all-gather", "all-to-all", "all-reduce", "collective-permute")),
                  "error": max(float(jnp.abs(a - b).max()) for a, b in zip(got, want))}))
'''


def test_blocked_under_a_data_x_tensor_mesh_equals_one_device():
    """8 simulated devices, (data 2, fsdp 1, tensor 4), batch and heads (8 q, 4 kv) sharded: the
    compiled fwd + bwd of "blocked" has no collective and equals one device's exactly."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _SHARDED_BLOCKED], cwd=root, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"collectives": 0, "error": 0.0}, result
