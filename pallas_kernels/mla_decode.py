"""Absorbed MLA decode over the latent cache: split-K flash-decoding with a combine step.

    s_j = (q_lat . c_kv_j + q_pe . k_pe_j) * scale   for cache slots j < length, else masked
    o = softmax(s) c_kv                              (512 + 64 score dims, 512 value dims)

Every query row (a head of a token) attends to the one shared latent "KV head", so the kernel
takes rows [b, M, .] (M = tokens x heads) with a visible length per row. The cache axis is cut
into ``num_splits`` chunks; a program (batch, row block, chunk) runs the online softmax over its
chunk's blocks and writes the unnormalised partial (o, m, l); the combine rescales the partials to
the global max:  o = sum_c exp(m_c - m) o_c / sum_c exp(m_c - m) l_c.  The combine is plain jnp
(it reads num_splits x M x 512 fp32, small next to the cache).

Masked slots score finfo(f32).min like the jnp reference (so a row with nothing visible averages
the cache uniformly, as the reference does); slots past the cache end, when it is padded to whole
blocks, score -inf and their (zero-padded) values never count. Portable Pallas: one body lowered
by Mosaic (TPU: rows and blocks multiples of 8) and Triton (GPU: power-of-two tiles >= 16). Every
program reads its whole chunk (no early exit at the row lengths: that needs a scalar read of the
lengths, SMEM on TPU, a scalar load on GPU); the padding of a cache that is not a whole number of
blocks copies it, so callers size caches in multiples of ``block_t``.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.flash_mla import MASKED, _dot, _dot_nt, _params
from pallas_kernels.platform import check_blocks, forward_only, gpu_big_shared_memory

BACKENDS = ("tpu", "gpu", "interpret")
DEFAULTS = {
    "tpu": (128, 128, 4),
    "gpu": (64, 64, 4),
    "interpret": (64, 64, 2),
}  # block_m, block_t, num_splits; GPU untuned
SMALL_SMEM_GPU = (32, 32, 4)  # ~99 KiB of shared memory (A10, L4, RTX): 74 KiB; (64, 64) takes 216 KiB on an H100


def _decode_kernel(ql_ref, qp_ref, ckv_ref, kp_ref, len_ref, o_ref, m_ref, l_ref, *, scale, block_t, num_keys):
    bm, chunk = ql_ref.shape[0], ckv_ref.shape[0]
    ql, qp, length = ql_ref[...], qp_ref[...], len_ref[...]  # [bm, r], [bm, dr], [bm, 1]
    start = pl.program_id(2) * chunk

    def step(j, carry):
        o, m, l = carry
        ts = pl.ds(pl.multiple_of(j * block_t, block_t), block_t)
        slot = start + j * block_t + lax.broadcasted_iota(jnp.int32, (1, block_t), 1)
        c = ckv_ref[ts, :]
        s = jnp.where(slot < length, (_dot_nt(ql, c) + _dot_nt(qp, kp_ref[ts, :])) * scale, MASKED)
        s = jnp.where(slot < num_keys, s, -jnp.inf)  # cache padding: no weight, even in empty rows
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        p, alpha = jnp.exp(s - m_new), jnp.exp(m - m_new)
        return alpha * o + _dot(p.astype(c.dtype), c), m_new, alpha * l + jnp.sum(p, axis=1, keepdims=True)

    init = (jnp.zeros((bm, ckv_ref.shape[1]), jnp.float32), jnp.full((bm, 1), MASKED), jnp.zeros((bm, 1), jnp.float32))
    o, m, l = lax.fori_loop(0, chunk // block_t, step, init)
    o_ref[...], m_ref[...], l_ref[...] = o, m, l


def combine(o, m, l):
    """Partials o [b, C, M, r], m and l [b, C, M, 1] of C chunks -> softmax-weighted output [b, M, r]."""
    w = jnp.exp(m - jnp.max(m, axis=1, keepdims=True))
    return jnp.sum(w * o, axis=1) / jnp.sum(w * l, axis=1)


def mla_decode(
    q_lat,
    q_pe,
    c_kv,
    k_pe,
    lengths,
    scale: float,
    *,
    backend: str = "interpret",
    block_m: int | None = None,
    block_t: int | None = None,
    num_splits: int | None = None,
):
    """softmax((q_lat . c_kv + q_pe . k_pe) * scale, slots < length) c_kv, per query row.

    q_lat [b, M, r] (q_nope with W_UK folded in), q_pe [b, M, dr], c_kv [b, T, r], k_pe [b, T, dr],
    lengths [b, M] int (visible slots per row). Returns [b, M, r] in c_kv's dtype. Not
    differentiable (decoding). backend: "tpu" (Mosaic), "gpu" (Triton), "interpret"."""
    if backend not in BACKENDS:
        raise ValueError(f"mla_decode: backend must be one of {BACKENDS}, got {backend!r}")
    b, rows, r = q_lat.shape
    t, dr = c_kv.shape[1], q_pe.shape[-1]
    want = {"q_pe": (b, rows, dr), "c_kv": (b, t, r), "k_pe": (b, t, dr), "lengths": (b, rows)}
    for (name, shape), x in zip(want.items(), (q_pe, c_kv, k_pe, lengths)):
        if x.shape != shape:
            raise ValueError(
                f"mla_decode: {name} has shape {x.shape}, expected {shape} "
                f"(from q_lat {q_lat.shape}, c_kv {c_kv.shape})"
            )
    dm, dt, dc = SMALL_SMEM_GPU if backend == "gpu" and not gpu_big_shared_memory() else DEFAULTS[backend]
    floor = 16 if backend == "gpu" else 8
    block_m = block_m or max(floor, min(dm, pl.next_power_of_2(rows)))
    block_t = block_t or dt
    if (num_splits or dc) < 1:
        raise ValueError(f"mla_decode: num_splits={num_splits} must be >= 1")
    check_blocks("mla_decode", backend, block_m=block_m, block_t=block_t)
    blocks = pl.cdiv(t, block_t)
    num_splits = max(
        d for d in range(1, min(num_splits or dc, blocks) + 1) if blocks % d == 0
    )  # chunks of whole blocks
    chunk = blocks // num_splits * block_t

    pad_t, pad_m = blocks * block_t - t, -rows % block_m
    c_kv, k_pe = (jnp.pad(x, ((0, 0), (0, pad_t), (0, 0))) if pad_t else x for x in (c_kv, k_pe))
    q_lat, q_pe = (jnp.pad(x, ((0, 0), (0, pad_m), (0, 0))) for x in (q_lat, q_pe))
    lengths = jnp.pad(lengths.astype(jnp.int32), ((0, 0), (0, pad_m)))[..., None]
    m_pad = rows + pad_m

    row = lambda d: pl.BlockSpec((None, block_m, d), lambda b, i, c: (b, i, 0))  # noqa: E731
    cache = lambda d: pl.BlockSpec((None, chunk, d), lambda b, i, c: (b, c, 0))  # noqa: E731
    part = lambda d: pl.BlockSpec((None, None, block_m, d), lambda b, i, c: (b, c, i, 0))  # noqa: E731
    kernel = pl.pallas_call(
        functools.partial(_decode_kernel, scale=float(scale), block_t=block_t, num_keys=t),
        grid=(b, m_pad // block_m, num_splits),
        in_specs=[row(r), row(dr), cache(r), cache(dr), row(1)],
        out_specs=[part(r), part(1), part(1)],
        out_shape=[jax.ShapeDtypeStruct((b, num_splits, m_pad, d), jnp.float32) for d in (r, 1, 1)],
        name="mla_decode",
        **_params(backend, 3, num_warps=8),  # GPU: a [block_m, 512] fp32 accumulator per program
    )
    o, m, l = forward_only("mla_decode", kernel, q_lat, q_pe, c_kv, k_pe, lengths)
    return combine(o, m, l)[:, :rows].astype(c_kv.dtype)
