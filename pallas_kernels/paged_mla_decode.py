"""Absorbed MLA decode over a PAGED latent cache: ``mla_decode`` read through a page table.

    slot j of sequence b = row j % page_size of page page_table[b, j // page_size] of the pool
    s_j = (q_lat . c_kv_j + q_pe . k_pe_j) * scale   for slots j < length, else masked
    o = softmax(s) c_kv                              (512 + 64 score dims, 512 value dims)

The pool (P pages of ``page_size`` slots) is shared by all sequences, as in a serving engine's
PagedAttention; MLA has one latent "KV head", so a page holds c_kv [page_size, r] and k_pe
[page_size, dr] for every head. The math, the split-K over ``num_splits`` chunks of the slots and
the jnp ``combine`` of the partials are ``pallas_kernels.mla_decode``'s; a block is
``pages_per_block`` pages. Pages are read through the table inside the kernel, never gathered in
jnp first. One online-softmax step (``_step``) serves two bodies, as the compilers read a table
differently:

- "tpu" (Mosaic) and "interpret": scalar prefetch. The table and each row block's reach (below)
  sit in SMEM (``pltpu.PrefetchScalarGridSpec``; flat, b * n int32: the table must fit there) and
  each page's BlockSpec index_map picks the page, so the Pallas pipeline DMAs (double-buffers)
  exactly the pages read. The grid is (batch, row block, chunk, block of the chunk); the pool is
  passed ``pages_per_block`` times, one BlockSpec per page of a block; the partials accumulate in
  the output blocks over the last ("arbitrary") axis.
- "gpu" (Triton): JAX's Triton lowering has no scalar prefetch ("scalar prefetch not implemented
  in the Triton backend"), but loads at a vector of indices. A program (batch, row block, chunk)
  loops over its blocks like ``mla_decode``: it loads the block's page ids from its table row and
  gathers the block's rows from the pool, viewed as [P * page_size, r] (a free reshape).
  With ``INTERPRET_BODY = "gpu"`` the "interpret" backend runs this body (tests on CPU).

Masked slots score finfo(f32).min like the jnp reference (gather the pages into a contiguous
cache, softmax over slots < length), so a row with length 0 averages all n * page_size gathered
slots uniformly, as the reference does. Early exit: a row block reads slots up to its reach, the
length of its longest row (all n * page_size slots if one of its rows is empty: that row averages
them all). Past the reach every row's weight is an exact 0, so stopping there is exact: the TPU
body skips those steps' compute and DMAs (the index_maps repeat the last page read, a block
Pallas does not copy again), the GPU loop ends there. Table entries past a sequence's lengths may
be any page id in [0, P): unread, or read with weight 0 in the pages the reach ends in (NaN there
would poison the row, as in the reference); ids outside [0, P) are not checked. The table is
padded (page 0) to whole chunks of whole blocks; padded slots score -inf. Tiles: TPU, block_m and
page_size multiples of 8 (a page is a block); GPU, block_m and pages_per_block * page_size powers
of two >= 16.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.flash_mla import MASKED, _dot, _dot_nt, _params
from pallas_kernels.mla_decode import SMALL_SMEM_GPU, combine
from pallas_kernels.platform import check_blocks, forward_only, gpu_big_shared_memory

BACKENDS = ("tpu", "gpu", "interpret")
DEFAULTS = {
    "tpu": (128, 128, 4),
    "gpu": (64, 64, 4),
    "interpret": (64, 64, 2),
}  # block_m, slots per block (pages_per_block = slots // page_size, at least 1), num_splits; GPU untuned
INTERPRET_BODY = "tpu"  # the body "interpret" runs; tests set "gpu" to interpret the Triton one


def _step(carry, ql, qp, tiles, length, *, scale, num_keys):
    """One online-softmax step of ``mla_decode`` over tiles (c_kv [t, r], k_pe [t, dr], slot ids [1, t])."""
    o, m, l = carry
    scores = []
    for c, kp, slot in tiles:
        s = jnp.where(slot < length, (_dot_nt(ql, c) + _dot_nt(qp, kp)) * scale, MASKED)
        scores.append(jnp.where(slot < num_keys, s, -jnp.inf))  # table padding: no weight, even in empty rows
    m_new = m
    for s in scores:
        m_new = jnp.maximum(m_new, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    o, l = alpha * o, alpha * l
    for s, (c, _, _) in zip(scores, tiles):
        p = jnp.exp(s - m_new)
        o, l = o + _dot(p.astype(c.dtype), c), l + jnp.sum(p, axis=1, keepdims=True)
    return o, m_new, l


def _init(bm, r):
    return jnp.zeros((bm, r), jnp.float32), jnp.full((bm, 1), MASKED), jnp.zeros((bm, 1), jnp.float32)


def _prefetch_kernel(pt_ref, reach_ref, ql_ref, qp_ref, *refs, pages, page_size, chunk, **kw):
    """TPU body, grid (b, row block, chunk, block): refs = ``pages`` c_kv pages, ``pages`` k_pe pages
    (the index_maps chose them), lengths, then o, m, l: resident over the block axis, the accumulators."""
    del pt_ref  # read by the index_maps
    ckv_refs, kp_refs, (len_ref, o_ref, m_ref, l_ref) = refs[:pages], refs[pages : 2 * pages], refs[2 * pages :]
    start = pl.program_id(2) * chunk + pl.program_id(3) * pages * page_size

    @pl.when(pl.program_id(3) == 0)
    def _():
        o_ref[...], m_ref[...], l_ref[...] = _init(*o_ref.shape)

    @pl.when(start < reach_ref[pl.program_id(0) * pl.num_programs(1) + pl.program_id(1)])
    def _():
        iota = lax.broadcasted_iota(jnp.int32, (1, page_size), 1)
        tiles = [(c[...], k[...], start + u * page_size + iota) for u, (c, k) in enumerate(zip(ckv_refs, kp_refs))]
        carry = (o_ref[...], m_ref[...], l_ref[...])
        o_ref[...], m_ref[...], l_ref[...] = _step(carry, ql_ref[...], qp_ref[...], tiles, len_ref[...], **kw)


def _gather_kernel(
    pt_ref, reach_ref, ql_ref, qp_ref, ckv_ref, kp_ref, len_ref, o_ref, m_ref, l_ref, *, pages, page_size, chunk, **kw
):
    """GPU body, grid (b, row block, chunk): pt_ref [n_pad] (the sequence's table row), reach_ref [1],
    the pool as [P * page_size, .]; a loop over the chunk's blocks up to the reach gathers their rows."""
    block_t = pages * page_size
    ql, qp, length = ql_ref[...], qp_ref[...], len_ref[...]
    start = pl.program_id(2) * chunk  # outside the loop: the interpreter substitutes no program id inside
    steps = jnp.clip(lax.div(reach_ref[0] - start + block_t - 1, block_t), 0, chunk // block_t)

    def body(j, carry):
        slot = start + j * block_t + lax.broadcasted_iota(jnp.int32, (block_t,), 0)
        rows = pt_ref[lax.div(slot, page_size)] * page_size + lax.rem(slot, page_size)  # the block's slots' pool rows
        return _step(carry, ql, qp, [(ckv_ref[rows, :], kp_ref[rows, :], slot[None, :])], length, **kw)

    o_ref[...], m_ref[...], l_ref[...] = lax.fori_loop(0, steps, body, _init(*o_ref.shape))


def _gather_call(table, reach, q_lat, q_pe, c_kv_pages, k_pe_pages, lengths, *, interpret, block_m, splits, **kw):
    """The GPU body's pallas_call: partials o [b, C, M, r], m, l [b, C, M, 1] of the padded inputs."""
    (b, m_pad, r), (num_pages, page_size, dr), n_pad = q_lat.shape, k_pe_pages.shape, table.shape[1]
    row = lambda d: pl.BlockSpec((None, block_m, d), lambda b, i, c: (b, i, 0))
    part = lambda d: pl.BlockSpec((None, None, block_m, d), lambda b, i, c: (b, c, i, 0))
    pool = lambda d: pl.BlockSpec((num_pages * page_size, d), lambda b, i, c: (0, 0))
    kernel = pl.pallas_call(
        functools.partial(_gather_kernel, page_size=page_size, chunk=n_pad // splits * page_size, **kw),
        grid=(b, m_pad // block_m, splits),
        in_specs=[
            pl.BlockSpec((None, n_pad), lambda b, i, c: (b, 0)),
            pl.BlockSpec((None, 1), lambda b, i, c: (b, i)),
            row(r),
            row(dr),
            pool(r),
            pool(dr),
            row(1),
        ],
        out_specs=[part(r), part(1), part(1)],
        out_shape=[jax.ShapeDtypeStruct((b, splits, m_pad, d), jnp.float32) for d in (r, 1, 1)],
        name="paged_mla_decode",
        **_params("interpret" if interpret else "gpu", 3, num_warps=8),  # a [block_m, 512] fp32 accumulator
    )
    flat = lambda x: x.reshape(num_pages * page_size, x.shape[-1])  # free: pages are contiguous rows
    return kernel(table, reach, q_lat, q_pe, flat(c_kv_pages), flat(k_pe_pages), lengths)


def _prefetch_call(
    table, reach, q_lat, q_pe, c_kv_pages, k_pe_pages, lengths, *, interpret, block_m, splits, pages, **kw
):
    """The TPU body's pallas_call: partials o [b, C, M, r], m, l [b, C, M, 1] of the padded inputs."""
    from jax.experimental.pallas import tpu as pltpu

    (b, m_pad, r), (_, page_size, dr), n_pad = q_lat.shape, k_pe_pages.shape, table.shape[1]
    blocks_m, per_split = m_pad // block_m, n_pad // (pages * splits)  # row blocks, blocks per chunk

    def page(d, u):  # page u of the step's block, as the table in SMEM says; past the reach, the last read
        def index(b, i, c, k, pt, reach):
            last = lax.div(reach[b * blocks_m + i] - 1, page_size)  # non-negative: no floor
            return pt[b * n_pad + jnp.minimum((c * per_split + k) * pages + u, last)], 0, 0

        return pl.BlockSpec((None, page_size, d), index)

    row = lambda d: pl.BlockSpec((None, block_m, d), lambda b, i, c, k, *_: (b, i, 0))
    part = lambda d: pl.BlockSpec((None, None, block_m, d), lambda b, i, c, k, *_: (b, c, i, 0))
    semantics = ("parallel",) * 3 + ("arbitrary",)  # the block axis carries the accumulators
    params = (
        dict(interpret=True) if interpret else dict(compiler_params=pltpu.CompilerParams(dimension_semantics=semantics))
    )
    kernel = pl.pallas_call(
        functools.partial(_prefetch_kernel, pages=pages, page_size=page_size, chunk=n_pad // splits * page_size, **kw),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,  # table and reach, flat: SMEM pads a 2-D array's last dim
            grid=(b, blocks_m, splits, per_split),
            in_specs=[
                row(r),
                row(dr),
                *(page(r, u) for u in range(pages)),
                *(page(dr, u) for u in range(pages)),
                row(1),
            ],
            out_specs=[part(r), part(1), part(1)],
        ),
        out_shape=[jax.ShapeDtypeStruct((b, splits, m_pad, d), jnp.float32) for d in (r, 1, 1)],
        name="paged_mla_decode",
        **params,
    )
    pools = [c_kv_pages] * pages + [k_pe_pages] * pages
    return kernel(table.reshape(-1), reach.reshape(-1), q_lat, q_pe, *pools, lengths)


def paged_mla_decode(
    q_lat,
    q_pe,
    c_kv_pages,
    k_pe_pages,
    page_table,
    lengths,
    scale: float,
    *,
    backend: str = "interpret",
    block_m: int | None = None,
    pages_per_block: int | None = None,
    num_splits: int | None = None,
):
    """q_lat [b, M, r], q_pe [b, M, dr], c_kv_pages [P, page_size, r], k_pe_pages [P, page_size, dr]
    (the pool: P pages shared by all sequences), page_table [b, n] int32 (sequence b's logical slot j
    lives at page page_table[b, j // page_size], offset j % page_size), lengths [b, M] int32 (visible
    logical slots per query row: slot j visible iff j < length). Returns [b, M, r] in c_kv's dtype:
    softmax((q_lat . c_kv_j + q_pe . k_pe_j) * scale over visible j) c_kv_j. Not differentiable.
    backend: "tpu" (Mosaic, scalar prefetch), "gpu" (Triton, gathers), "interpret" (the TPU body)."""
    if backend not in BACKENDS:
        raise ValueError(f"paged_mla_decode: backend must be one of {BACKENDS}, got {backend!r}")
    ranks = (
        ("q_lat", q_lat, "[b, M, r]"),
        ("c_kv_pages", c_kv_pages, "[P, page_size, r]"),
        ("page_table", page_table, "[b, n]"),
    )
    for name, x, dims in ranks:
        if x.ndim != dims.count(",") + 1 or 0 in x.shape:
            raise ValueError(f"paged_mla_decode: {name} has shape {x.shape}, expected {dims} (no dim 0)")
    b, rows, r = q_lat.shape
    num_pages, page_size = c_kv_pages.shape[:2]
    dr, n = q_pe.shape[-1], page_table.shape[-1]
    want = {
        "q_pe": (b, rows, dr),
        "c_kv_pages": (num_pages, page_size, r),
        "k_pe_pages": (num_pages, page_size, dr),
        "page_table": (b, n),
        "lengths": (b, rows),
    }
    for (name, shape), x in zip(want.items(), (q_pe, c_kv_pages, k_pe_pages, page_table, lengths)):
        if x.shape != shape:
            raise ValueError(
                f"paged_mla_decode: {name} has shape {x.shape}, expected {shape} "
                f"(from q_lat {q_lat.shape}, c_kv_pages {c_kv_pages.shape})"
            )
    for name, x in (("page_table", page_table), ("lengths", lengths)):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"paged_mla_decode: {name} has dtype {x.dtype}, expected int32")
    dm, dt, dc = SMALL_SMEM_GPU if backend == "gpu" and not gpu_big_shared_memory() else DEFAULTS[backend]
    block_m = block_m or max(16 if backend == "gpu" else 8, min(dm, pl.next_power_of_2(rows)))
    pages = pages_per_block or max(1, dt // page_size)
    if pages < 1 or (num_splits or dc) < 1:
        raise ValueError(f"paged_mla_decode: pages_per_block={pages} and num_splits={num_splits} must be >= 1")
    tiles = {"block_t": pages * page_size} if backend == "gpu" else {"page_size": page_size}
    check_blocks("paged_mla_decode", backend, block_m=block_m, **tiles)

    blocks = pl.cdiv(n, pages)
    per_split = pl.cdiv(blocks, min(num_splits or dc, blocks))
    splits = pl.cdiv(blocks, per_split)  # no chunk of padding only
    table = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, splits * per_split * pages - n)))  # page 0
    pad_m = -rows % block_m
    q_lat, q_pe = (jnp.pad(x, ((0, 0), (0, pad_m), (0, 0))) for x in (q_lat, q_pe))
    lengths = jnp.pad(lengths.astype(jnp.int32), ((0, 0), (0, pad_m)), mode="edge")  # padded rows: dropped
    blk = lengths.reshape(b, -1, block_m)  # a row block reads up to its longest row; all if a row is empty
    reach = jnp.where(blk.min(-1) > 0, jnp.minimum(blk.max(-1), n * page_size), n * page_size)
    body = INTERPRET_BODY if backend == "interpret" else backend
    kernel = functools.partial(
        _gather_call if body == "gpu" else _prefetch_call,
        interpret=backend == "interpret",
        block_m=block_m,
        splits=splits,
        pages=pages,
        scale=float(scale),
        num_keys=n * page_size,
    )
    args = (table, reach, q_lat, q_pe, c_kv_pages, k_pe_pages, lengths[..., None])
    o, m, l = forward_only("paged_mla_decode", kernel, *args)
    return combine(o, m, l)[:, :rows].astype(c_kv_pages.dtype)
