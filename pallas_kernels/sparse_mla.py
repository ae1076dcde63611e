"""Sparse MLA attention (DeepSeek V3.2's DSA), forward and backward: each query reads only its k selected slots.

    idx_j = indices[b, s, j]                     (-1 = no slot: masked)
    S_j = (q_lat . c_kv[idx_j] + q_pe . k_pe[idx_j]) * scale     [h, k] per query, one latent "KV head"
    O = softmax(S) c_kv[idx]                     online over blocks of block_k slots; saves lse = m + log l
    backward (FlashAttention-2 over the selected slots): P = exp(S - lse), dP = dO c_kv[idx]^T,
    D = rowsum(dO * O), dS = P (dP - D) scale, dq_lat = dS c_kv[idx], dq_pe = dS k_pe[idx],
    dc_kv[idx_j] += dS_j^T q_lat + P_j^T dO, dk_pe[idx_j] += dS_j^T q_pe   (a scatter-add, fp32)

A program owns one query (b, s) and a block of ``block_h`` heads: the heads are the matmul rows
([block_h, r + dr] x [r + dr, block_k], MQA over the latent), the selected slots the columns. Time
and memory grow with k, never with the t slots: only the selected rows of c_kv / k_pe are read
(nothing [b, s, k, r] is materialised), and the loop stops at the query's reach, one past its last
valid index (-1s trailing, as the indexer emits them: the loop never visits them). The backward is
one kernel: it recomputes P from lse, accumulates dq_lat / dq_pe, and scatter-adds each block's
[block_k, r] / [block_k, dr] rows into fp32 accumulators of dc_kv / dk_pe (zeros in, aliased out).

Masked slots score finfo(f32).min like the jnp reference (``sparse_latent_attention_reference``:
-1 reads slot 0 at weight 0), so a row whose every index is -1 averages slot 0 uniformly: here its
reach is 1, one slot-0 read at weight 1, the same value (and the same gradient: dO into dc_kv[0]).
-1s may also sit anywhere before the reach (masked there too). Duplicated indices each count, as
in the reference. Slots past the reach (and the padding of k to whole blocks) score -inf.

Two bodies, as the compilers read rows at run-time indices differently:

- "tpu" (Mosaic) and "interpret": each query's clamped indices (plus its reach and, backward, one
  duplicate flag per block) are an SMEM block; c_kv / k_pe stay in HBM (``pltpu.HBM``) and a block's
  rows are DMA-gathered, one ``make_async_copy`` per row, into a double-buffered VMEM scratch (block
  j + 1's rows fly while block j computes). Mosaic DMAs only whole (8, 128) tiles of a [t, r] array
  (a single row at a run-time offset is refused), so the kernel reads c_kv / k_pe as [b, t, 1, d]:
  a row per leading index. That view is an XLA relayout, one O(t) copy per call (bf16 rows padded
  to 2 sublanes): small beside prefill / training's s * k rows, but for decode (s = 1) the caller
  should hold the cache in that layout (not done here). The backward's scatter is a read-modify-write of the
  rows of the fp32 accumulators in HBM: gather the block's rows, add, DMA them back, wait. The grid's
  query and head axes are sequential ("arbitrary"; batch is parallel: disjoint rows) and every write
  lands before the next read, so it is race-free; a block whose indices repeat (the wrapper flags it)
  does it row by row, since the batched form would read the same old row twice.
- "gpu" (Triton): no scalar prefetch, but loads at a vector of indices: a loop over the blocks loads
  the indices and gathers the rows (``c_kv_ref[idx, :]``); the backward's scatter is an fp32 atomic
  add (``jax.ref.addupdate`` lowers to Triton's atomic_rmw fadd; in interpret mode to a scatter-add,
  so repeated indices count the same in both). With ``INTERPRET_BODY = "gpu"`` the "interpret"
  backend runs this body (tests on CPU).

Tiles: TPU, block_k a multiple of 128 (scores and indices are sliced along lanes), block_h of 8;
GPU, block_k, block_h, r and dr powers of two >= 16. The heads are padded to whole blocks.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.flash_mla import MASKED, _dot, _dot_nt, _params
from pallas_kernels.platform import check_blocks

BACKENDS = ("tpu", "gpu", "interpret")
DEFAULTS = {"tpu": (128, 128), "gpu": (32, 32), "interpret": (16, 16)}  # most heads a block, block_k; GPU untuned
INTERPRET_BODY = "tpu"  # the body "interpret" runs; tests set "gpu" to interpret the Triton one


def _dot_tn(a, b):
    """a^T b in fp32: [n, m] x [n, d] -> [m, d]."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _scores(ql, qp, c, kp, idx, pos, reach, scale):
    """Masked scaled scores [h, bk]: -1 indices finfo.min (the reference's mask), past the reach -inf."""
    s = jnp.where(idx >= 0, (_dot_nt(ql, c) + _dot_nt(qp, kp)) * scale, MASKED)
    return jnp.where(pos < reach, s, -jnp.inf)


def _step(carry, s, c):
    """One online-softmax step over a block of scores s [h, bk] and values c [bk, r]."""
    o, m, l = carry
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    p, alpha = jnp.exp(s - m_new), jnp.exp(m - m_new)
    return alpha * o + _dot(p.astype(c.dtype), c), m_new, alpha * l + jnp.sum(p, axis=1, keepdims=True)


def _init(bh, r):
    return jnp.zeros((bh, r), jnp.float32), jnp.full((bh, 1), MASKED), jnp.zeros((bh, 1), jnp.float32)


def _finish(o_ref, lse_ref, carry):
    o, m, l = carry
    o_ref[...], lse_ref[...] = (o / l).astype(o_ref.dtype), m + jnp.log(l)


def _grads(ql, qp, do, lse, delta, s, c, kp, idx, scale):
    """One backward block: (dq_lat, dq_pe) contributions [h, r], [h, dr] and the rows to scatter,
    (dc_kv, dk_pe) [bk, r], [bk, dr], all fp32. P = exp(S - lse); dS = P (dP - D) scale on real slots."""
    p = jnp.exp(s - lse)
    ds = jnp.where((idx >= 0) & (s > -jnp.inf), p * (_dot_nt(do, c) - delta) * scale, 0.0)
    dsc = ds.astype(c.dtype)
    dq = (_dot(dsc, c), _dot(dsc, kp))
    dkv = (_dot_tn(ds.astype(ql.dtype), ql) + _dot_tn(p.astype(do.dtype), do), _dot_tn(ds.astype(qp.dtype), qp))
    return dq, dkv


# -- TPU body: indices in SMEM, rows DMA-gathered from HBM into VMEM --------------------------------


def _row_dmas(meta_ref, first, n, b, pairs, sems, *, to_hbm=False):
    """Starts n row DMAs per (hbm [b, t, d], vmem [bk, d]) pair: hbm[b, meta[first + u]] <-> vmem[u]."""
    from jax.experimental.pallas import tpu as pltpu

    def body(u, _):
        row = meta_ref[0, first + u]
        for (hbm, vmem), sem in zip(pairs, sems):
            ends = (hbm.at[b, row], vmem.at[u])
            pltpu.make_async_copy(*(ends[::-1] if to_hbm else ends), sem).start()

    lax.fori_loop(0, n, body, None)


def _wait_rows(n, pairs, sems):
    """Waits for n row DMAs on each pair's semaphore (a row-sized descriptor per wait)."""
    from jax.experimental.pallas import tpu as pltpu

    def body(u, _):
        for (hbm, vmem), sem in zip(pairs, sems):
            pltpu.make_async_copy(hbm.at[0, 0], vmem.at[0], sem).wait()

    lax.fori_loop(0, n, body, None)


def _tpu_blocks(meta_ref, ckv_hbm, kp_hbm, c_buf, k_buf, sem, *, k_pad, step, init):
    """Loops over the query's blocks up to its reach, block j's rows gathered into buffer j % 2 while
    block j - 1 computes: ``step(j, carry, c [bk, r], k_pe [bk, dr])``."""
    b, reach, bk = pl.program_id(0), meta_ref[0, k_pad], c_buf.shape[1]
    pairs = lambda slot: ((ckv_hbm, c_buf.at[slot]), (kp_hbm, k_buf.at[slot]))  # noqa: E731
    sems = lambda slot: (sem.at[0, slot], sem.at[1, slot])  # noqa: E731
    _row_dmas(meta_ref, 0, bk, b, pairs(0), sems(0))
    blocks = lax.div(reach + bk - 1, bk)

    def body(j, carry):
        slot = lax.rem(j, 2)

        @pl.when(j + 1 < blocks)
        def _():
            _row_dmas(meta_ref, (j + 1) * bk, bk, b, pairs(1 - slot), sems(1 - slot))

        _wait_rows(bk, pairs(slot), sems(slot))
        return step(j, carry, c_buf[slot].reshape(bk, -1), k_buf[slot].reshape(bk, -1))

    return lax.fori_loop(0, blocks, body, init)


def _tpu_fwd_kernel(meta_ref, ids_ref, ql_ref, qp_ref, ckv_hbm, kp_hbm, o_ref, lse_ref, c_buf, k_buf, sem, **kw):
    """Grid (b, s, head block); meta_ref [k_pad + 1] (SMEM: clamped indices, reach), ids_ref [1, k_pad]."""
    k_pad, scale = kw["k_pad"], kw["scale"]
    ql, qp, bk, reach = ql_ref[...], qp_ref[...], c_buf.shape[1], meta_ref[0, k_pad]

    def step(j, carry, c, kp):
        cols = pl.ds(pl.multiple_of(j * bk, bk), bk)
        pos = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        return _step(carry, _scores(ql, qp, c, kp, ids_ref[:, cols], pos, reach, scale), c)

    carry = _tpu_blocks(meta_ref, ckv_hbm, kp_hbm, c_buf, k_buf, sem, k_pad=k_pad, step=step, init=_init(*o_ref.shape))
    _finish(o_ref, lse_ref, carry)


def _tpu_bwd_kernel(meta_ref, ids_ref, ql_ref, qp_ref, do_ref, lse_ref, delta_ref, ckv_hbm, kp_hbm, *refs, **kw):
    """Grid (b, s, head block), s and heads sequential; meta_ref [k_pad + 1 + blocks] (SMEM: clamped
    indices, reach, a duplicate flag per block). refs: the accumulators in (aliased), dq_lat, dq_pe,
    the accumulators out (HBM), then scratch: gathered rows x2, accumulator rows, contributions, sems."""
    _, _, dql_ref, dqp_ref, dc_hbm, dk_hbm, c_buf, k_buf, a_buf, ak_buf, d_buf, dk_buf, sem = refs
    k_pad, scale = kw["k_pad"], kw["scale"]
    ql, qp, do, lse, delta = ql_ref[...], qp_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    b, bk, reach = pl.program_id(0), c_buf.shape[1], meta_ref[0, k_pad]
    acc_pairs, acc_sems = ((dc_hbm, a_buf), (dk_hbm, ak_buf)), (sem.at[2, 0], sem.at[2, 1])

    def step(j, carry, c, kp):
        cols = pl.ds(pl.multiple_of(j * bk, bk), bk)
        idx, pos = ids_ref[:, cols], j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        s = _scores(ql, qp, c, kp, idx, pos, reach, scale)
        (dql, dqp), (dc, dk) = _grads(ql, qp, do, lse, delta, s, c, kp, idx, scale)
        d_buf[...], dk_buf[...] = dc.reshape(d_buf.shape), dk.reshape(dk_buf.shape)
        rows = jnp.minimum(bk, reach - j * bk)  # slots past the reach add nothing: not scattered

        @pl.when(meta_ref[0, k_pad + 1 + j] == 0)
        def _():  # distinct rows: read all, add, write all back
            _row_dmas(meta_ref, j * bk, rows, b, acc_pairs, acc_sems)
            _wait_rows(rows, acc_pairs, acc_sems)
            a_buf[...] += d_buf[...]
            ak_buf[...] += dk_buf[...]
            _row_dmas(meta_ref, j * bk, rows, b, acc_pairs, acc_sems, to_hbm=True)
            _wait_rows(rows, acc_pairs, acc_sems)

        @pl.when(meta_ref[0, k_pad + 1 + j] != 0)
        def _():  # repeated rows: one at a time, each read after the previous write landed
            def one(u, _):
                _row_dmas(meta_ref, j * bk + u, 1, b, acc_pairs, acc_sems)  # into row 0
                _wait_rows(1, acc_pairs, acc_sems)
                a_buf[0] += d_buf[u]
                ak_buf[0] += dk_buf[u]
                _row_dmas(meta_ref, j * bk + u, 1, b, acc_pairs, acc_sems, to_hbm=True)
                _wait_rows(1, acc_pairs, acc_sems)

            lax.fori_loop(0, rows, one, None)

        return carry[0] + dql, carry[1] + dqp

    init = (jnp.zeros(ql.shape, jnp.float32), jnp.zeros(qp.shape, jnp.float32))
    dql, dqp = _tpu_blocks(meta_ref, ckv_hbm, kp_hbm, c_buf, k_buf, sem, k_pad=k_pad, step=step, init=init)
    dql_ref[...], dqp_ref[...] = dql.astype(dql_ref.dtype), dqp.astype(dqp_ref.dtype)


def _tpu_specs(k_pad, meta_len, bh):
    """BlockSpecs of the per-query meta (SMEM), the indices row (VMEM), and head-blocked [b, s, h, d] arrays."""
    from jax.experimental.pallas import tpu as pltpu

    meta = pl.BlockSpec((None, None, 1, meta_len), lambda b, i, g: (b, i, 0, 0), memory_space=pltpu.SMEM)
    ids = pl.BlockSpec((None, None, 1, k_pad), lambda b, i, g: (b, i, 0, 0))
    rows = lambda d: pl.BlockSpec((None, None, bh, d), lambda b, i, g: (b, i, g, 0))  # noqa: E731
    return meta, ids, rows, pl.BlockSpec(memory_space=pltpu.HBM)


def _tpu_params(interpret, semantics):
    from jax.experimental.pallas import tpu as pltpu

    return (
        dict(interpret=True) if interpret else dict(compiler_params=pltpu.CompilerParams(dimension_semantics=semantics))
    )


def _tpu_scratch(c_kv, k_pe, bk, backward):
    from jax.experimental.pallas import tpu as pltpu

    (r, dr), dt = (c_kv.shape[-1], k_pe.shape[-1]), c_kv.dtype
    gathered = [pltpu.VMEM((2, bk, 1, r), dt), pltpu.VMEM((2, bk, 1, dr), dt)]
    if not backward:
        return [*gathered, pltpu.SemaphoreType.DMA((2, 2))]
    f32 = [pltpu.VMEM((bk, 1, d), jnp.float32) for d in (r, dr, r, dr)]  # accumulator rows, contributions
    return [*gathered, *f32, pltpu.SemaphoreType.DMA((3, 2))]


def _tpu_forward(q_lat, q_pe, c_kv, k_pe, ids, meta, *, interpret, block_h, block_k, scale):
    (b, s, h, r), dr, k_pad = q_lat.shape, q_pe.shape[-1], ids.shape[-1]
    meta_spec, ids_spec, rows, hbm = _tpu_specs(k_pad, meta.shape[-1], block_h)
    return pl.pallas_call(
        functools.partial(_tpu_fwd_kernel, k_pad=k_pad, scale=scale),
        grid=(b, s, h // block_h),
        in_specs=[meta_spec, ids_spec, rows(r), rows(dr), hbm, hbm],
        out_specs=[rows(r), rows(1)],
        out_shape=[jax.ShapeDtypeStruct((b, s, h, r), c_kv.dtype), jax.ShapeDtypeStruct((b, s, h, 1), jnp.float32)],
        scratch_shapes=_tpu_scratch(c_kv, k_pe, block_k, backward=False),
        name="sparse_mla_fwd",
        **_tpu_params(interpret, ("parallel",) * 3),
    )(meta[:, :, None], ids[:, :, None], q_lat, q_pe, c_kv[:, :, None], k_pe[:, :, None])


def _tpu_backward(q_lat, q_pe, c_kv, k_pe, ids, meta, do, lse, delta, *, interpret, block_h, block_k, scale):
    (b, s, h, r), dr, k_pad = q_lat.shape, q_pe.shape[-1], ids.shape[-1]
    meta_spec, ids_spec, rows, hbm = _tpu_specs(k_pad, meta.shape[-1], block_h)
    accs = [jnp.zeros((b, x.shape[1], 1, x.shape[2]), jnp.float32) for x in (c_kv, k_pe)]
    dql, dqp, dc, dk = pl.pallas_call(
        functools.partial(_tpu_bwd_kernel, k_pad=k_pad, scale=scale),
        grid=(b, s, h // block_h),
        in_specs=[meta_spec, ids_spec, rows(r), rows(dr), rows(r), rows(1), rows(1), hbm, hbm, hbm, hbm],
        out_specs=[rows(r), rows(dr), hbm, hbm],
        out_shape=[
            jax.ShapeDtypeStruct(q_lat.shape, q_lat.dtype),
            jax.ShapeDtypeStruct(q_pe.shape, q_pe.dtype),
            *(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in accs),
        ],
        scratch_shapes=_tpu_scratch(c_kv, k_pe, block_k, backward=True),
        input_output_aliases={9: 2, 10: 3},
        name="sparse_mla_bwd",
        **_tpu_params(interpret, ("parallel", "arbitrary", "arbitrary")),  # the scatter's order: see the docstring
    )(meta[:, :, None], ids[:, :, None], q_lat, q_pe, do, lse, delta, c_kv[:, :, None], k_pe[:, :, None], *accs)
    return dql, dqp, dc[:, :, 0], dk[:, :, 0]


# -- GPU body: a loop over the blocks gathers rows at a vector of indices ---------------------------


def _gpu_blocks(ids_ref, reach_ref, ckv_ref, kp_ref, *, block_k, step, init):
    """Loops over the query's blocks up to its reach: ``step(carry, c, k_pe, idx [1, bk], pos [1, bk], rows [bk])``."""
    reach = reach_ref[0]

    def body(j, carry):
        idx = ids_ref[pl.ds(j * block_k, block_k)]
        rows = jnp.maximum(idx, 0)  # -1 reads slot 0, at weight 0
        pos = j * block_k + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
        return step(carry, ckv_ref[rows, :], kp_ref[rows, :], idx[None, :], pos[None, :], rows)

    return lax.fori_loop(0, lax.div(reach + block_k - 1, block_k), body, init)


def _gpu_fwd_kernel(ids_ref, reach_ref, ql_ref, qp_ref, ckv_ref, kp_ref, o_ref, lse_ref, *, block_k, scale):
    """Grid (b, s, head block); ids_ref [k_pad], reach_ref [1], c_kv / k_pe [t, .] of batch b."""
    ql, qp, reach = ql_ref[...], qp_ref[...], reach_ref[0]

    def step(carry, c, kp, idx, pos, rows):
        return _step(carry, _scores(ql, qp, c, kp, idx, pos, reach, scale), c)

    _finish(
        o_ref,
        lse_ref,
        _gpu_blocks(ids_ref, reach_ref, ckv_ref, kp_ref, block_k=block_k, step=step, init=_init(*o_ref.shape)),
    )


def _gpu_bwd_kernel(ids_ref, reach_ref, ql_ref, qp_ref, do_ref, lse_ref, delta_ref, ckv_ref, kp_ref, *refs, **kw):
    """Grid (b, s, head block), all parallel; refs: the accumulators in (aliased), dq_lat, dq_pe, the
    accumulators [t, .] of batch b, which each block's rows are atomically added into."""
    _, _, dql_ref, dqp_ref, dc_ref, dk_ref = refs
    ql, qp, do, lse, delta, reach = ql_ref[...], qp_ref[...], do_ref[...], lse_ref[...], delta_ref[...], reach_ref[0]

    def step(carry, c, kp, idx, pos, rows):
        s = _scores(ql, qp, c, kp, idx, pos, reach, kw["scale"])
        (dql, dqp), (dc, dk) = _grads(ql, qp, do, lse, delta, s, c, kp, idx, kw["scale"])
        jax.ref.addupdate(dc_ref, (rows, slice(None)), dc)  # Triton: atomic fadd; slots past the reach add 0
        jax.ref.addupdate(dk_ref, (rows, slice(None)), dk)
        return carry[0] + dql, carry[1] + dqp

    init = (jnp.zeros(ql.shape, jnp.float32), jnp.zeros(qp.shape, jnp.float32))
    dql, dqp = _gpu_blocks(ids_ref, reach_ref, ckv_ref, kp_ref, block_k=kw["block_k"], step=step, init=init)
    dql_ref[...], dqp_ref[...] = dql.astype(dql_ref.dtype), dqp.astype(dqp_ref.dtype)


def _gpu_specs(k_pad, t, bh):
    """BlockSpecs of the indices row, the reach, head-blocked [b, s, h, d] arrays and batch b's [t, d] slots."""
    ids = pl.BlockSpec((None, None, k_pad), lambda b, i, g: (b, i, 0))
    reach = pl.BlockSpec((None, None, 1), lambda b, i, g: (b, i, 0))
    rows = lambda d: pl.BlockSpec((None, None, bh, d), lambda b, i, g: (b, i, g, 0))  # noqa: E731
    slots = lambda d: pl.BlockSpec((None, t, d), lambda b, i, g: (b, 0, 0))  # noqa: E731
    return ids, reach, rows, slots


def _gpu_forward(q_lat, q_pe, c_kv, k_pe, ids, reach, *, interpret, block_h, block_k, scale):
    (b, s, h, r), (t, dr), k_pad = q_lat.shape, k_pe.shape[1:], ids.shape[-1]
    ids_spec, reach_spec, rows, slots = _gpu_specs(k_pad, t, block_h)
    return pl.pallas_call(
        functools.partial(_gpu_fwd_kernel, block_k=block_k, scale=scale),
        grid=(b, s, h // block_h),
        in_specs=[ids_spec, reach_spec, rows(r), rows(dr), slots(r), slots(dr)],
        out_specs=[rows(r), rows(1)],
        out_shape=[jax.ShapeDtypeStruct((b, s, h, r), c_kv.dtype), jax.ShapeDtypeStruct((b, s, h, 1), jnp.float32)],
        name="sparse_mla_fwd",
        **_params("interpret" if interpret else "gpu", 3, num_warps=4),
    )(ids, reach[..., None], q_lat, q_pe, c_kv, k_pe)


def _gpu_backward(q_lat, q_pe, c_kv, k_pe, ids, reach, do, lse, delta, *, interpret, block_h, block_k, scale):
    (b, s, h, r), (t, dr), k_pad = q_lat.shape, k_pe.shape[1:], ids.shape[-1]
    ids_spec, reach_spec, rows, slots = _gpu_specs(k_pad, t, block_h)
    accs = [jnp.zeros(x.shape, jnp.float32) for x in (c_kv, k_pe)]
    return pl.pallas_call(
        functools.partial(_gpu_bwd_kernel, block_k=block_k, scale=scale),
        grid=(b, s, h // block_h),
        in_specs=[ids_spec, reach_spec, rows(r), rows(dr), rows(r), rows(1), rows(1), slots(r), slots(dr)]
        + [slots(r), slots(dr)],
        out_specs=[rows(r), rows(dr), slots(r), slots(dr)],
        out_shape=[
            jax.ShapeDtypeStruct(q_lat.shape, q_lat.dtype),
            jax.ShapeDtypeStruct(q_pe.shape, q_pe.dtype),
            *(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in accs),
        ],
        input_output_aliases={9: 2, 10: 3},
        name="sparse_mla_bwd",
        **_params("interpret" if interpret else "gpu", 3, num_warps=8),
    )(ids, reach[..., None], q_lat, q_pe, do, lse, delta, c_kv, k_pe, *accs)


# -- the custom_vjp over both bodies ------------------------------------------------------------------


def _reach(ids):
    """[b, s] one past the last index >= 0; 1 for a row of -1s (it reads slot 0 at weight 1, see above)."""
    pos = jnp.arange(1, ids.shape[-1] + 1, dtype=jnp.int32)
    return jnp.maximum(jnp.max(jnp.where(ids >= 0, pos, 0), axis=-1), 1)


def _duplicates(ids, reach, block_k):
    """[b, s, blocks] int32: 1 where a block's slots before the reach repeat a (clamped) row."""
    b, s, k_pad = ids.shape
    pos = jnp.arange(k_pad, dtype=jnp.int32)
    live = jnp.where(pos < reach[..., None], jnp.maximum(ids, 0), -1 - pos)  # dead slots: distinct negatives
    srt = jnp.sort(live.reshape(b, s, k_pad // block_k, block_k), axis=-1)
    return jnp.any(srt[..., 1:] == srt[..., :-1], axis=-1).astype(jnp.int32)


def _meta(ids, reach, block_k, backward):
    """The TPU body's SMEM row per query: clamped indices, reach (and backward, the duplicate flags)."""
    parts = [jnp.maximum(ids, 0), reach[..., None]]
    return jnp.concatenate(parts + ([_duplicates(ids, reach, block_k)] if backward else []), axis=-1)


def _body(cfg):
    backend, block_h, block_k, scale = cfg
    body = INTERPRET_BODY if backend == "interpret" else backend
    return body, dict(interpret=backend == "interpret", block_h=block_h, block_k=block_k, scale=scale)


def _forward(q_lat, q_pe, c_kv, k_pe, ids, cfg):
    body, kw = _body(cfg)
    reach = _reach(ids)
    if body == "gpu":
        return _gpu_forward(q_lat, q_pe, c_kv, k_pe, ids, reach, **kw)
    return _tpu_forward(q_lat, q_pe, c_kv, k_pe, ids, _meta(ids, reach, kw["block_k"], False), **kw)


def _backward(cfg, res, do):
    q_lat, q_pe, c_kv, k_pe, ids, o, lse = res
    body, kw = _body(cfg)
    reach = _reach(ids)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)  # D = rowsum(dO * O)
    args = (q_lat, q_pe, c_kv, k_pe, ids)
    if body == "gpu":
        dql, dqp, dc, dk = _gpu_backward(*args, reach, do, lse, delta, **kw)
    else:
        dql, dqp, dc, dk = _tpu_backward(*args, _meta(ids, reach, kw["block_k"], True), do, lse, delta, **kw)
    return dql, dqp, dc.astype(c_kv.dtype), dk.astype(k_pe.dtype), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _sparse(q_lat, q_pe, c_kv, k_pe, ids, cfg):
    return _forward(q_lat, q_pe, c_kv, k_pe, ids, cfg)[0]


def _sparse_fwd(q_lat, q_pe, c_kv, k_pe, ids, cfg):
    o, lse = _forward(q_lat, q_pe, c_kv, k_pe, ids, cfg)
    return o, (q_lat, q_pe, c_kv, k_pe, ids, o, lse)


_sparse.defvjp(_sparse_fwd, _backward)


# -- public entry -------------------------------------------------------------------------------------


def _check(q_lat, q_pe, c_kv, k_pe, indices):
    """ValueError naming the first input whose shape or dtype does not fit."""
    ranks = (("q_lat", q_lat, "[b, s, h, r]"), ("c_kv", c_kv, "[b, t, r]"), ("indices", indices, "[b, s, k]"))
    for name, x, dims in ranks:
        if x.ndim != dims.count(",") + 1 or 0 in x.shape:
            raise ValueError(f"sparse_mla: {name} has shape {x.shape}, expected {dims} (no dim 0)")
    (b, s, h, r), t, dr, k = q_lat.shape, c_kv.shape[1], q_pe.shape[-1], indices.shape[-1]
    want = {"q_pe": (b, s, h, dr), "c_kv": (b, t, r), "k_pe": (b, t, dr), "indices": (b, s, k)}
    for (name, shape), x in zip(want.items(), (q_pe, c_kv, k_pe, indices)):
        if x.shape != shape:
            raise ValueError(
                f"sparse_mla: {name} has shape {x.shape}, expected {shape} "
                f"(from q_lat {q_lat.shape}, c_kv {c_kv.shape})"
            )
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(f"sparse_mla: indices has dtype {indices.dtype}, expected int32")


def _head_block(backend, body, h, block_h):
    """The heads per program: the override, else all heads up to the default (TPU: rounded up to 8;
    GPU: a power of two >= 16)."""
    if block_h:
        return block_h
    most = DEFAULTS[backend][0]
    if body == "gpu":
        return min(most, max(16, pl.next_power_of_2(h)))
    blocks = pl.cdiv(h, most)
    return pl.cdiv(pl.cdiv(h, blocks), 8) * 8


def sparse_mla(
    q_lat,
    q_pe,
    c_kv,
    k_pe,
    indices,
    scale: float,
    *,
    backend: str = "interpret",
    block_h: int | None = None,
    block_k: int | None = None,
):
    """DSA's sparse latent attention: softmax over the k selected slots of (q_lat . c_kv + q_pe . k_pe)
    * scale, times c_kv. q_lat [b,s,h,r], q_pe [b,s,h,dr], c_kv [b,t,r], k_pe [b,t,dr], indices
    [b,s,k] int32 (-1 = no slot; -1s trailing, as the indexer emits them). Returns [b,s,h,r] in c_kv's
    dtype, equal to ``sparse_latent_attention_reference``; differentiable in q_lat, q_pe, c_kv, k_pe
    (the backward is one Pallas kernel). backend: "tpu" (Mosaic), "gpu" (Triton), "interpret" (the
    ``INTERPRET_BODY`` body). block_h: heads per program; block_k: slots per step."""
    if backend not in BACKENDS:
        raise ValueError(f"sparse_mla: backend must be one of {BACKENDS}, got {backend!r}")
    _check(q_lat, q_pe, c_kv, k_pe, indices)
    (h, r), dr, k = q_lat.shape[2:], q_pe.shape[-1], indices.shape[-1]
    body = INTERPRET_BODY if backend == "interpret" else backend
    block_h = _head_block(backend, body, h, block_h)
    block_k = block_k or DEFAULTS[backend][1]
    check_blocks("sparse_mla", backend, lane_dense=True, block_k=block_k)
    check_blocks("sparse_mla", backend, block_h=block_h)
    if backend == "gpu":
        check_blocks("sparse_mla", backend, r=r, dr=dr)  # Triton loads whole rows: powers of two
    pad_h = -h % block_h
    if pad_h:  # padded heads: q = 0, dO = 0, so they add nothing to the slots' gradients
        q_lat, q_pe = (jnp.pad(x, ((0, 0), (0, 0), (0, pad_h), (0, 0))) for x in (q_lat, q_pe))
    ids = jnp.pad(indices.astype(jnp.int32), ((0, 0), (0, 0), (0, -k % block_k)), constant_values=-1)
    out = _sparse(q_lat, q_pe, c_kv, k_pe, ids, (backend, block_h, block_k, float(scale)))
    return out[:, :, :h] if pad_h else out
