"""Flash attention with MLA's head shapes, forward and backward (training / prefill, expanded form).

    S = (q_nope k_nope^T + q_pe k_pe^T) * scale, masked   qk 192 = 128 nope + 64 rope: two dots
    O = softmax(S) V, online over key blocks (running max m, sum l); saves lse = m + log l
    backward (FlashAttention-2): P = exp(S - lse), dV = P^T dO, dP = dO V^T, D = rowsum(dO * O),
    dS = P * (dP - D) * scale, dQ = dS K, dK = dS^T Q; k_pe is one head shared by all: dk_pe = sum_h.

Mask: query i sees key j iff j <= i and segment_ids[i] == segment_ids[j] (causal self-attention over
packed documents); key blocks past the diagonal are never visited. Masked scores are set to
finfo(f32).min, like the jnp reference, so a row's result is the same function of its scores.

One kernel body per pass, portable Pallas (BlockSpec grid over (batch, head, block); a fori_loop
over the other axis's blocks reads slices of a whole-sequence block), lowered by Mosaic on TPU and
Triton on GPU. Backend constraints, checked in ``_check_blocks``: Triton wants every loaded tile
power-of-two sized (so 192 is split into the 128 + 64 dots, never padded) and dots of >= 16;
Mosaic wants the (sublane, lane) dims of tiles in multiples of (8, 128): segment ids, lse and D
are sliced along lanes, so TPU blocks are multiples of 128. Sequences are padded up to a whole
number of blocks (padded queries get segment -1 and are dropped; padded keys are never visible
to a real query). The whole sequence of one head's K and V sits in VMEM / is addressed by the
program: fine to a few thousand tokens x 8 heads; longer sequences want a grid axis over keys.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.platform import check_blocks, gpu_big_shared_memory

MASKED = float(jnp.finfo(jnp.float32).min)  # score of a masked (query, key) pair, as the reference
BACKENDS = ("tpu", "gpu", "interpret")
DEFAULT_BLOCKS = {"tpu": (128, 128), "gpu": (128, 64), "interpret": (64, 64)}  # (block_q, block_k); GPU untuned
SMALL_SMEM_GPU_BLOCKS = (64, 64)  # ~99 KiB of shared memory (A10, L4, RTX): <= 89 KiB (tools/gpu_compile.py, L4)


def _dot_nt(a, b):
    """a b^T in fp32: [m, d] x [n, d] -> [m, n]."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):
    """a b in fp32: [m, d] x [d, n] -> [m, n]."""
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _scores(a_nope, a_pe, b_nope, b_pe):
    """a . b over the 192-dim q/k head as its 128 nope + 64 rope parts: [m, n] fp32."""
    return _dot_nt(a_nope, b_nope) + _dot_nt(a_pe, b_pe)


def _iota(shape, axis, start):
    return start + lax.broadcasted_iota(jnp.int32, shape, axis)


# -- forward: grid (batch, head, query block), loop over key blocks up to the diagonal ------------


def _fwd_kernel(qn_ref, qp_ref, kn_ref, kp_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, *, scale, block_k):
    bq = qn_ref.shape[0]
    i = pl.program_id(2)
    qn, qp, qseg = qn_ref[...], qp_ref[...], qseg_ref[...]  # [bq, dn], [bq, dr], [bq, 1]
    q_idx = _iota((bq, 1), 0, i * bq)

    def step(j, carry):
        o, m, l = carry
        ks = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        visible = (_iota((1, block_k), 1, j * block_k) <= q_idx) & (qseg == kseg_ref[:, ks])
        s = jnp.where(visible, _scores(qn, qp, kn_ref[ks, :], kp_ref[ks, :]) * scale, MASKED)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        p, alpha = jnp.exp(s - m_new), jnp.exp(m - m_new)  # online softmax: rescale what came before
        v = v_ref[ks, :]
        return alpha * o + _dot(p.astype(v.dtype), v), m_new, alpha * l + jnp.sum(p, axis=1, keepdims=True)

    init = (jnp.zeros((bq, v_ref.shape[1]), jnp.float32), jnp.full((bq, 1), MASKED), jnp.zeros((bq, 1), jnp.float32))
    o, m, l = lax.fori_loop(0, pl.cdiv((i + 1) * bq, block_k), step, init)
    o_ref[...] = (o / l).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


# -- backward dQ: grid (batch, head, query block), loop over key blocks up to the diagonal --------


def _dq_kernel(
    qn_ref,
    qp_ref,
    kn_ref,
    kp_ref,
    v_ref,
    qseg_ref,
    kseg_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dqn_ref,
    dqp_ref,
    *,
    scale,
    block_k,
):
    bq = qn_ref.shape[0]
    i = pl.program_id(2)
    qn, qp, qseg, do = qn_ref[...], qp_ref[...], qseg_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]  # [bq, 1]
    q_idx = _iota((bq, 1), 0, i * bq)

    def step(j, carry):
        dqn, dqp = carry
        ks = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        kn, kp = kn_ref[ks, :], kp_ref[ks, :]
        visible = (_iota((1, block_k), 1, j * block_k) <= q_idx) & (qseg == kseg_ref[:, ks])
        p = jnp.exp(jnp.where(visible, _scores(qn, qp, kn, kp) * scale, MASKED) - lse)
        ds = (p * (_dot_nt(do, v_ref[ks, :]) - delta) * scale).astype(kn.dtype)  # dS = P (dP - D) scale
        return dqn + _dot(ds, kn), dqp + _dot(ds, kp)

    init = (jnp.zeros(qn.shape, jnp.float32), jnp.zeros(qp.shape, jnp.float32))
    dqn, dqp = lax.fori_loop(0, pl.cdiv((i + 1) * bq, block_k), step, init)
    dqn_ref[...], dqp_ref[...] = dqn.astype(dqn_ref.dtype), dqp.astype(dqp_ref.dtype)


# -- backward dK, dV: grid (batch, head, key block), loop over query blocks from the diagonal -----


def _dkv_kernel(
    qn_ref,
    qp_ref,
    kn_ref,
    kp_ref,
    v_ref,
    qseg_ref,
    kseg_ref,
    do_ref,
    lse_ref,
    delta_ref,
    dkn_ref,
    dkp_ref,
    dv_ref,
    *,
    scale,
    block_q,
):
    bk = kn_ref.shape[0]
    j = pl.program_id(2)
    kn, kp, v, kseg = kn_ref[...], kp_ref[...], v_ref[...], kseg_ref[...]  # kseg [bk, 1]
    k_idx = _iota((bk, 1), 0, j * bk)

    def step(i, carry):  # everything transposed: keys are rows, queries columns
        dkn, dkp, dv = carry
        qs = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
        qn, qp, do = qn_ref[qs, :], qp_ref[qs, :], do_ref[qs, :]
        visible = (k_idx <= _iota((1, block_q), 1, i * block_q)) & (kseg == qseg_ref[:, qs])
        p = jnp.exp(jnp.where(visible, _scores(kn, kp, qn, qp) * scale, MASKED) - lse_ref[:, qs])  # P^T
        ds = (p * (_dot_nt(v, do) - delta_ref[:, qs]) * scale).astype(qn.dtype)  # dS^T
        return dkn + _dot(ds, qn), dkp + _dot(ds, qp), dv + _dot(p.astype(do.dtype), do)

    init = tuple(jnp.zeros(r.shape, jnp.float32) for r in (kn_ref, kp_ref, v_ref))
    dkn, dkp, dv = lax.fori_loop((j * bk) // block_q, qn_ref.shape[0] // block_q, step, init)
    dkn_ref[...], dkp_ref[...], dv_ref[...] = dkn.astype(dkn_ref.dtype), dkp, dv.astype(dv_ref.dtype)


# -- pallas_calls on the kernel layout: q/k/v [b, h, S, d] head-major, k_pe [b, S, dr], S padded --


def _params(backend: str, dims: int, num_warps: int = 4):
    """Per-backend compiler parameters (the type picks the lowering: Mosaic or Triton)."""
    if backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return dict(compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",) * dims))
    if backend == "gpu":
        from jax.experimental.pallas import triton as plgpu

        return dict(compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2))
    return dict(interpret=True)


def _specs(b, h, s, dn, dr, dv, blocked: str, block: int):
    """BlockSpecs of (qn, qp, kn, kp, v, q segment ids, k segment ids, do, lse, delta): the ``blocked``
    side ("q" or "k") in blocks of ``block`` along the grid's last axis, the other side whole."""

    def spec(d, is_q, per_head=True):
        if (blocked == "q") == is_q:
            shape, index = (block, d), lambda b, h, i: (i, 0)
        else:
            shape, index = (s, d), lambda b, h, i: (0, 0)
        if per_head:
            return pl.BlockSpec((None, None, *shape), lambda b, h, i: (b, h, *index(b, h, i)))
        return pl.BlockSpec((None, *shape), lambda b, h, i: (b, *index(b, h, i)))

    def row_spec(is_q, per_head):  # ids / lse / delta as a row [1, S] on the whole-sequence side
        if (blocked == "q") == is_q:  # ... and as a column [block, 1] on the blocked side
            return spec(1, is_q, per_head)
        lead = (None, None) if per_head else (None,)
        return pl.BlockSpec((*lead, 1, s), lambda b, h, i: (b, h, 0, 0) if per_head else (b, 0, 0))

    return [
        spec(dn, True),
        spec(dr, True),
        spec(dn, False),
        spec(dr, False, per_head=False),
        spec(dv, False),
        row_spec(True, False),
        row_spec(False, False),
        spec(dv, True),
        row_spec(True, True),
        row_spec(True, True),
    ]


def _orient(x, col: bool):
    """[..., S] -> [..., S, 1] (column: the blocked side) or [..., 1, S] (row: the whole side)."""
    return x[..., :, None] if col else x[..., None, :]


def _forward(qn, qp, kn, kp, v, seg, scale, blocks):
    block_q, block_k, backend = blocks
    b, h, s, dn = qn.shape
    dr, dv = qp.shape[-1], v.shape[-1]
    specs = _specs(b, h, s, dn, dr, dv, "q", block_q)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, scale=scale, block_k=block_k),
        grid=(b, h, s // block_q),
        in_specs=specs[:7],
        out_specs=[specs[7], specs[8]],
        out_shape=[jax.ShapeDtypeStruct((b, h, s, dv), v.dtype), jax.ShapeDtypeStruct((b, h, s, 1), jnp.float32)],
        name="flash_mla_fwd",
        **_params(backend, 3, num_warps=8 if block_q >= 128 else 4),
    )(qn, qp, kn, kp, v, _orient(seg, True), _orient(seg, False))


def _backward(scale, blocks, res, g):
    block_q, block_k, backend = blocks
    qn, qp, kn, kp, v, seg, o, lse = res
    do = g[0]  # the lse output is internal: no cotangent flows into it
    b, h, s, dn = qn.shape
    dr, dv = qp.shape[-1], v.shape[-1]
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # D = rowsum(dO * O) [b, h, s]
    lse = lse[..., 0]
    q_specs = _specs(b, h, s, dn, dr, dv, "q", block_q)
    dqn, dqp = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, block_k=block_k),
        grid=(b, h, s // block_q),
        in_specs=q_specs,
        out_specs=[q_specs[0], q_specs[1]],
        out_shape=[jax.ShapeDtypeStruct(qn.shape, qn.dtype), jax.ShapeDtypeStruct(qp.shape, qp.dtype)],
        name="flash_mla_dq",
        **_params(backend, 3),
    )(qn, qp, kn, kp, v, _orient(seg, True), _orient(seg, False), do, _orient(lse, True), _orient(delta, True))
    k_specs = _specs(b, h, s, dn, dr, dv, "k", block_k)
    dkp_spec = pl.BlockSpec((None, None, block_k, dr), lambda b, h, j: (b, h, j, 0))  # per head, summed below
    dkn, dkp, dv_ = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, block_q=block_q),
        grid=(b, h, s // block_k),
        in_specs=k_specs,
        out_specs=[k_specs[2], dkp_spec, k_specs[4]],
        out_shape=[
            jax.ShapeDtypeStruct(kn.shape, kn.dtype),
            jax.ShapeDtypeStruct((b, h, s, dr), jnp.float32),
            jax.ShapeDtypeStruct(v.shape, v.dtype),
        ],
        name="flash_mla_dkv",
        **_params(backend, 3),
    )(qn, qp, kn, kp, v, _orient(seg, False), _orient(seg, True), do, _orient(lse, False), _orient(delta, False))
    return dqn, dqp, dkn, dkp.sum(axis=1).astype(kp.dtype), dv_, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _flash(qn, qp, kn, kp, v, seg, scale, blocks):
    return _forward(qn, qp, kn, kp, v, seg, scale, blocks)[0]


def _flash_fwd(qn, qp, kn, kp, v, seg, scale, blocks):
    o, lse = _forward(qn, qp, kn, kp, v, seg, scale, blocks)
    return o, (qn, qp, kn, kp, v, seg, o, lse)


_flash.defvjp(_flash_fwd, lambda scale, blocks, res, do: _backward(scale, blocks, res, (do,)))


# -- public entry ---------------------------------------------------------------------------------


def _check_blocks(backend: str, block_q: int, block_k: int):
    """Raises ValueError when the blocks do not fit the backend (before anything is traced)."""
    check_blocks("flash_mla", backend, lane_dense=True, block_q=block_q, block_k=block_k)
    if max(block_q, block_k) % min(block_q, block_k):
        raise ValueError(f"flash_mla: block_q={block_q} and block_k={block_k}: one must divide the other")


def _fit(block: int, s: int, backend: str) -> int:
    """The default block, shrunk (by halving, keeping the backend's constraints) for short sequences."""
    floor = {"tpu": 128, "gpu": 16, "interpret": 8}[backend]
    while block // 2 >= floor and block // 2 >= s:
        block //= 2
    return block


def flash_mla(
    q_nope,
    q_pe,
    k_nope,
    k_pe,
    v,
    segment_ids,
    scale: float,
    *,
    backend: str = "interpret",
    block_q: int | None = None,
    block_k: int | None = None,
):
    """Causal self-attention within segments: softmax((q_nope.k_nope + q_pe.k_pe) * scale + mask) v.

    q_nope [b,s,h,dn], q_pe [b,s,h,dr], k_nope [b,s,h,dn], k_pe [b,s,dr] (one head, shared),
    v [b,s,h,dv], segment_ids [b,s] int. Returns [b,s,h,dv] in v's dtype; differentiable (the
    backward runs the dQ and dK/dV kernels). backend: "tpu" (Mosaic), "gpu" (Triton), "interpret"."""
    if backend not in BACKENDS:
        raise ValueError(f"flash_mla: backend must be one of {BACKENDS}, got {backend!r}")
    b, s, h, dn = q_nope.shape
    dr, dv = q_pe.shape[-1], v.shape[-1]
    want = {
        "q_pe": (b, s, h, dr),
        "k_nope": (b, s, h, dn),
        "k_pe": (b, s, dr),
        "v": (b, s, h, dv),
        "segment_ids": (b, s),
    }
    for (name, shape), x in zip(want.items(), (q_pe, k_nope, k_pe, v, segment_ids)):
        if x.shape != shape:
            raise ValueError(f"flash_mla: {name} has shape {x.shape}, expected {shape} (from q_nope {q_nope.shape})")
    small_gpu = backend == "gpu" and not gpu_big_shared_memory()  # (128, 64)'s dK/dV kernel needs 201 KiB on an H100
    dq, dk = SMALL_SMEM_GPU_BLOCKS if small_gpu else DEFAULT_BLOCKS[backend]
    block_q, block_k = block_q or _fit(dq, s, backend), block_k or _fit(dk, s, backend)
    _check_blocks(backend, block_q, block_k)

    pad = -s % max(block_q, block_k)
    heads_major = lambda x: jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, pad), (0, 0)))  # noqa: E731
    seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, pad)), constant_values=-1)
    k_pe = jnp.pad(k_pe, ((0, 0), (0, pad), (0, 0)))
    out = _flash(
        heads_major(q_nope),
        heads_major(q_pe),
        heads_major(k_nope),
        k_pe,
        heads_major(v),
        seg,
        float(scale),
        (block_q, block_k, backend),
    )
    return jnp.swapaxes(out[:, :, :s], 1, 2)
