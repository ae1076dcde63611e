"""Sparse MLA (pallas_kernels.sparse_mla, DeepSeek V3.2's DSA) against a numpy float64 restatement of
the math, forward and its hand-written backward (scatter-add of the selected slots' gradients):
Pallas interpret mode on CPU, both bodies (the TPU one: indices in SMEM, rows DMA-gathered, the
backward's scatter a read-modify-write by DMA; the GPU one: rows gathered at a vector of indices,
the scatter an atomic add); trailing -1s, a lone valid index, rows of -1s, repeated and unsorted
indices, k not whole blocks, t >> k; the dense latent attention when every visible slot is
selected; lowering to Mosaic (TPU) and Triton (GPU) of forward + backward, libtpu's compiler;
named errors."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels.sparse_mla as sparse
from dsjax.model.attention import latent_attention_reference
from pallas_kernels.sparse_mla import sparse_mla
from tests.kernels.test_paged_mla_decode import kernel_calls
from tests.model.test_attention import lowered_kernels

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
SCALE = 0.3


def _gather(x, ids):
    return x[np.arange(x.shape[0])[:, None, None], np.maximum(ids, 0)]  # [b, s, k, d]; -1 reads slot 0


def reference(q_lat, q_pe, c_kv, k_pe, ids, scale, g=None):
    """float64: the output, and with a cotangent g [b, s, h, r] the gradients (dq_lat, dq_pe, dc_kv,
    dk_pe) of sum(g * output): masked scores finfo(f32).min, dS = P (dP - rowsum(P dP)), the selected
    slots' gradients scatter-added (np.add.at: repeated indices each count)."""
    q_lat, q_pe, c_kv, k_pe = (np.asarray(x, np.float64) for x in (q_lat, q_pe, c_kv, k_pe))
    ids = np.asarray(ids)
    c_sel, k_sel = _gather(c_kv, ids), _gather(k_pe, ids)
    s = (np.einsum("bshr,bskr->bshk", q_lat, c_sel) + np.einsum("bshd,bskd->bshk", q_pe, k_sel)) * scale
    valid = (ids >= 0)[:, :, None]
    s = np.where(valid, s, np.finfo(np.float32).min)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bshk,bskr->bshr", p, c_sel)
    if g is None:
        return out
    g = np.asarray(g, np.float64)
    dp = np.einsum("bshr,bskr->bshk", g, c_sel)
    ds = np.where(valid, p * (dp - (p * dp).sum(-1, keepdims=True)) * scale, 0.0)
    dc_sel = np.einsum("bshk,bshr->bskr", ds, q_lat) + np.einsum("bshk,bshr->bskr", p, g)
    dk_sel = np.einsum("bshk,bshd->bskd", ds, q_pe)
    dc, dk = np.zeros_like(c_kv), np.zeros_like(k_pe)
    rows = (np.arange(ids.shape[0])[:, None, None], np.maximum(ids, 0))
    np.add.at(dc, rows, dc_sel)
    np.add.at(dk, rows, dk_sel)
    return out, (np.einsum("bshk,bskr->bshr", ds, c_sel), np.einsum("bshk,bskd->bshd", ds, k_sel), dc, dk)


def sparse_inputs(seed, s, h, t, k, r=32, dr=16, dtype=jnp.float32):
    """b = 2, s >= 4 queries of k slots each out of t: batch 0 sorted distinct indices, query 1 with
    trailing -1s, query 2 a lone valid index, query 3 all -1; batch 1 unsorted, with a repeat inside
    the first block (positions 1, 2), one across blocks (k - 1 repeats 0), trailing -1s in query 0."""
    assert s >= 4 and k >= 12
    rng = np.random.default_rng(seed)
    draw = lambda *shape: jnp.asarray(0.5 * rng.standard_normal(shape), dtype)  # noqa: E731
    q_lat, q_pe, c_kv, k_pe = draw(2, s, h, r), draw(2, s, h, dr), draw(2, t, r), draw(2, t, dr)
    ids = np.stack([np.sort(rng.choice(t, k, replace=False)) for _ in range(2 * s)]).reshape(2, s, k)
    ids[1] = rng.permuted(ids[1], axis=-1)
    ids[0, 1, k // 2 :], ids[0, 2, 1:], ids[0, 3] = -1, -1, -1
    ids[1, :, 2], ids[1, :, k - 1] = ids[1, :, 1], ids[1, :, 0]
    ids[1, 0, k - 3 :] = -1
    return q_lat, q_pe, c_kv, k_pe, jnp.asarray(ids, jnp.int32)


def run(body, fn):
    """fn() with the "interpret" backend running ``body``'s kernels ("tpu": DMA gathers, "gpu": vector loads)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sparse, "INTERPRET_BODY", body)
        return fn()


@pytest.mark.parametrize("body", ["tpu", "gpu"])
@pytest.mark.parametrize(
    "s,h,t,k,block_h,block_k,dtype",
    [
        (4, 8, 40, 20, None, 8, jnp.float32),  # 3 blocks, the last partial
        (5, 20, 400, 12, None, 16, jnp.float32),  # t >> k; heads padded (TPU: 24, GPU: 32 in 2 blocks)
        (4, 16, 64, 24, 8, 8, jnp.bfloat16),  # 2 head blocks on the TPU body
    ],
)
def test_forward_equals_reference(body, s, h, t, k, block_h, block_k, dtype):
    args = sparse_inputs(s + h, s, h, t, k, dtype=dtype)
    block_h = block_h if body == "tpu" else None
    got = run(body, lambda: sparse_mla(*args, SCALE, block_h=block_h, block_k=block_k))
    assert got.shape == (2, s, h, 32) and got.dtype == dtype
    want = reference(*args, SCALE)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=TOL[dtype], rtol=TOL[dtype])
    np.testing.assert_allclose(np.asarray(got[0, 3], np.float32), np.broadcast_to(args[2][0, 0], (h, 32)), atol=1e-2)


@pytest.mark.parametrize("body", ["tpu", "gpu"])
def test_gradients_equal_reference(body):
    """The gradients of a random linear functional sum(g * out) against the float64 numpy backward:
    repeated slots (within a block and across blocks) accumulate, rows of -1s send dO to slot 0."""
    args = sparse_inputs(3, 4, 8, 48, 20)
    g = jax.random.normal(jax.random.key(1), (2, 4, 8, 32))
    loss = lambda *x: jnp.sum(sparse_mla(*x, args[4], SCALE, block_k=8) * g)  # noqa: E731
    got = run(body, lambda: jax.grad(loss, argnums=range(4))(*args[:4]))
    _, want = reference(*args, SCALE, g)
    for name, x, y in zip(("q_lat", "q_pe", "c_kv", "k_pe"), got, want):
        np.testing.assert_allclose(np.asarray(x), y, atol=2e-5, rtol=2e-5, err_msg=name)
    untouched = np.setdiff1d(np.arange(48), np.asarray(args[4]))  # slots nobody selected: exact zeros
    assert untouched.size and not np.asarray(got[2])[:, untouched].any()


def test_bf16_gradients_equal_reference():
    """bf16 inputs, the TPU body: fp32 accumulation, one rounding at the end."""
    args = sparse_inputs(5, 4, 8, 40, 16, dtype=jnp.bfloat16)
    g = jax.random.normal(jax.random.key(2), (2, 4, 8, 32))
    loss = lambda *x: jnp.sum(sparse_mla(*x, args[4], SCALE, block_k=8).astype(jnp.float32) * g)  # noqa: E731
    got = jax.grad(loss, argnums=range(4))(*args[:4])
    _, want = reference(*args, SCALE, g)
    for name, x, y in zip(("q_lat", "q_pe", "c_kv", "k_pe"), got, want):
        assert x.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(x, np.float32), y, atol=5e-2, rtol=5e-2, err_msg=name)


def test_all_visible_slots_equal_dense_causal_attention():
    """Query i selecting slots 0..i (then -1s): the dense latent attention under a causal mask,
    forward and gradients (both in float32 jnp)."""
    s, h = 12, 8
    q_lat, q_pe, c_kv, k_pe, _ = sparse_inputs(7, s, h, s, 12)
    ids = jnp.where(jnp.arange(s)[None, :] <= jnp.arange(s)[:, None], jnp.arange(s)[None, :], -1)
    ids = jnp.broadcast_to(ids, (2, s, s)).astype(jnp.int32)
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((s, s), bool)), (2, s, s))
    g = jax.random.normal(jax.random.key(3), (2, s, h, 32))
    sparse_loss = lambda *x: jnp.sum(sparse_mla(*x, ids, SCALE, block_k=8) * g)  # noqa: E731
    dense_loss = lambda *x: jnp.sum(latent_attention_reference(*x, mask, SCALE) * g)  # noqa: E731
    got, want = (jax.value_and_grad(f, argnums=range(4))(q_lat, q_pe, c_kv, k_pe) for f in (sparse_loss, dense_loss))
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-5, rtol=2e-5)


# On a TPU or GPU this runs the real Mosaic / Triton kernels with the backend's default blocks
# (`pytest -m accelerator tests/kernels/test_sparse_mla.py` on a lent machine); on CPU, the interpreter.
ON_DEVICE = jax.default_backend() if jax.default_backend() in ("tpu", "gpu") else "interpret"


@pytest.mark.accelerator
def test_on_this_backend_equals_reference_at_v3_latent_dims():
    """Latent 512 + rope 64, bf16, 16 heads, 300 slots of which 40 are selected, default blocks."""
    args = sparse_inputs(9, 4, 16, 300, 40, r=512, dr=64, dtype=jnp.bfloat16)
    g = jax.random.normal(jax.random.key(4), (2, 4, 16, 512))
    loss = lambda *x: jnp.sum(sparse_mla(*x, args[4], 0.07, backend=ON_DEVICE).astype(jnp.float32) * g)  # noqa: E731
    out, grads = jax.jit(lambda *a: (sparse_mla(*a, args[4], 0.07, backend=ON_DEVICE), jax.grad(loss, range(4))(*a)))(
        *args[:4]
    )
    want, want_grads = reference(*args, 0.07, g)
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=2e-2, rtol=2e-2)
    for x, y in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(x, np.float32), y, atol=5e-2 * np.abs(y).max(), rtol=5e-2)


def v3_args(s=300, t=3000, sharding=None):
    """DeepSeek's latent dims (512 + 64), bf16, 16 heads, k = 2048 of t slots, s not whole blocks."""
    sds = lambda *shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)  # noqa: E731
    return sds(1, s, 16, 512), sds(1, s, 16, 64), sds(1, t, 512), sds(1, t, 64), sds(1, s, 2048, dt=jnp.int32)


def train(backend):
    """The gradients of forward + backward: (q_lat, q_pe, c_kv, k_pe, indices) -> 4 gradients."""

    def fn(*a):
        loss = lambda *x: sparse_mla(*x, a[4], 0.1, backend=backend).astype(jnp.float32).sum()  # noqa: E731
        return jax.grad(loss, argnums=range(4))(*a[:4])

    return fn


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_forward_and_backward_lower_for_tpu_and_gpu(backend):
    """One forward kernel, one backward kernel (dq and the scatter fused); no gather of the slots
    outside them (only the indices' bookkeeping)."""
    fwd = lambda *a: sparse_mla(*a, 0.1, backend=backend)  # noqa: E731
    assert lowered_kernels(fwd, v3_args(), backend) == 1
    assert lowered_kernels(train(backend), v3_args(), backend) == 2
    calls, outside = kernel_calls(train(backend), *v3_args())
    assert [c.params["name"] for c in calls] == ["sparse_mla_fwd", "sparse_mla_bwd"]
    assert not outside & {"gather", "dynamic_slice", "scatter-add", "scatter_add"}, outside


TPU_COMPILE = """
import sys, jax
from jax.sharding import SingleDeviceSharding
from dsjax.parallel.topology import tpu_devices
from pallas_kernels.sparse_mla import sparse_mla
from tests.kernels.test_sparse_mla import train, v3_args
for topology in sys.argv[1:]:
    on = SingleDeviceSharding(tpu_devices(topology)[0])
    jax.jit(lambda *a: sparse_mla(*a, 0.1, backend="tpu")).trace(*v3_args(40, 3000, on)).lower().compile()
    jax.jit(train("tpu")).trace(*v3_args(40, 3000, on)).lower().compile()
    print("compiled")
"""


@pytest.mark.slow
def test_kernel_compiles_for_tpu():
    """Beyond lowering: libtpu's compiler (Mosaic's layouts, the SMEM index blocks, the row DMAs
    both ways) accepts the forward and backward kernels at V3's dims for a v5e and a v6e."""
    pytest.importorskip("libtpu", reason="libtpu has no wheel for this platform (the test extra installs it on Linux)")
    out = subprocess.run(
        [sys.executable, "-c", TPU_COMPILE, "v5e:1x1", "v6e:1x1"],
        capture_output=True,
        text=True,
        env={**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"},
        cwd=Path(__file__).parents[2],
        timeout=600,
    )
    assert out.returncode == 0 and out.stdout.split() == ["compiled"] * 2, out.stderr[-3000:]


def test_bad_inputs_raise_named_errors():
    q_lat, q_pe, c_kv, k_pe, ids = sparse_inputs(0, 4, 8, 40, 12)
    args = [q_lat, q_pe, c_kv, k_pe, ids]
    bad = {
        0: (q_lat[0], r"q_lat has shape \(4, 8, 32\), expected \[b, s, h, r\]"),
        1: (q_pe[:, :3], r"q_pe has shape \(2, 3, 8, 16\), expected \(2, 4, 8, 16\)"),
        2: (c_kv[..., :8], r"c_kv has shape \(2, 40, 8\), expected \(2, 40, 32\)"),
        3: (k_pe[:, :30], r"k_pe has shape \(2, 30, 16\), expected \(2, 40, 16\)"),
        4: (ids[:, :2], r"indices has shape \(2, 2, 12\), expected \(2, 4, 12\)"),
    }
    for i, (x, message) in bad.items():
        with pytest.raises(ValueError, match=message) as e:
            sparse_mla(*args[:i], x, *args[i + 1 :], SCALE)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="indices has dtype float32, expected int32"):
        sparse_mla(*args[:4], ids.astype(jnp.float32), SCALE)
    with pytest.raises(ValueError, match=r"backend must be one of \('tpu', 'gpu', 'interpret'\), got 'cuda'"):
        sparse_mla(*args, SCALE, backend="cuda")
    with pytest.raises(ValueError, match="block_k=64: Mosaic slices it along lanes, needs a multiple of 128"):
        sparse_mla(*args, SCALE, backend="tpu", block_k=64)
    with pytest.raises(ValueError, match="block_h=24: Triton wants a power of two >= 16"):
        sparse_mla(*args, SCALE, backend="gpu", block_h=24)
    with pytest.raises(ValueError, match="block_k=12 must be a positive multiple of 8"):
        sparse_mla(*args, SCALE, block_k=12)
    with pytest.raises(ValueError, match="dr=24: Triton wants a power of two >= 16"):
        sparse_mla(q_lat, jnp.zeros((2, 4, 8, 24)), c_kv, jnp.zeros((2, 40, 24)), ids, SCALE, backend="gpu")
