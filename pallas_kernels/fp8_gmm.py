"""Grouped block-scaled FP8 GEMMs for the routed experts, on the 128-row-block layout.

Rows are sorted by expert and each expert's rows padded to whole 128-row blocks (zero rows), so
every block belongs to one expert: ``block_group[i]`` (sorted). Two GEMMs, each promoted per
128-deep block exactly as ``fp8_gemm`` (V3 report §3.3.2):

    fp8_gmm:       C[i-th block] = sum_kb (A_i,kb B[g_i]_kb) a_s b_s[g_i]     (forward, dgrad)
    fp8_gmm_wgrad: C[g] = sum_{blocks i of g} (A_i^T B_i) a_s[i] b_s[i]       (wgrad; 128x1 tiles)

A [R, K] e4m3 (R = 128 x blocks). fp8_gmm: a_s [R, K/128]; B [G, K, N] with b_s [G, K/128, N/128]
(or per column [G, K/128, N]). fp8_gmm_wgrad: a_s [R/128, K], B [R, N], b_s [R/128, N], C fp32.
Implementations and ``impl`` as in ``fp8_gemm``: jnp reference, Mosaic TPU (the block's expert
picked by a scalar-prefetched table in the index maps), Mosaic GPU on Hopper and Triton on other
GPUs (the expert read in the kernel).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.fp8_gemm import (
    GPU_PARAMS,
    MGPU_TM,
    MGPU_TN,
    OUT_DTYPES,
    column_scales,
    gpu_k_loop,
    k_step,
    mgpu_column_scales,
    mgpu_kernel,
    mgpu_tile,
    pick,
    promote,
    tpu_mxu_dtype,
    tpu_scales,
    tpu_tile_body,
)
from pallas_kernels.platform import forward_only, kernel_for, resolve_impl, target_platform
from pallas_kernels.quant import E4M3, TILE, pad_to

# --- plain jnp references --------------------------------------------------------------------------


def fp8_gmm_reference(a, a_scale, b, b_scale, block_group, out_dtype=jnp.bfloat16):
    r, k = a.shape
    g, _, n = b.shape
    nb, kb = r // TILE, k // TILE
    blocks = (
        a.reshape(nb, TILE, kb, TILE).transpose(2, 0, 1, 3),  # [Kb, NB, 128, 128]
        b.reshape(g, kb, TILE, n).swapaxes(0, 1),  # [Kb, G, 128, N]
        a_scale.reshape(nb, TILE, kb).transpose(2, 0, 1)[..., None],  # [Kb, NB, 128, 1]
        column_scales(b_scale, n).swapaxes(0, 1)[:, :, None, :],  # [Kb, G, 1, N]
    )

    def step(acc, blk):
        a_k, b_k, as_k, bs_k = blk
        return promote(acc, a_k, b_k[block_group], as_k, bs_k[block_group]), None

    first, rest = jax.tree.map(lambda t: t[0], blocks), jax.tree.map(lambda t: t[1:], blocks)
    acc, _ = jax.lax.scan(step, step(0.0, first)[0], rest)  # carry from the data (fp8_gemm_reference)
    return acc.reshape(r, n).astype(out_dtype)


def fp8_gmm_wgrad_reference(a, a_scale, b, b_scale, block_group, num_groups: int):
    r, k = a.shape
    nb, n = r // TILE, b.shape[1]
    a3, b3 = a.reshape(nb, TILE, k).swapaxes(1, 2), b.reshape(nb, TILE, n)  # A_i^T [NB, K, 128], B_i
    part = promote(0.0, a3, b3, a_scale[:, :, None], b_scale[:, None, :])  # one promotion per block
    return jax.ops.segment_sum(part, block_group, num_segments=num_groups, indices_are_sorted=True)


# --- Mosaic TPU kernels ----------------------------------------------------------------------------


def fp8_gmm_tpu(a, a_scale, b, b_scale, block_group, out_dtype=jnp.bfloat16, interpret=False, tn=256):
    r, k = a.shape
    n = b.shape[2]
    s = k_step(k // TILE)
    tn = min(tn, -(-n // TILE) * TILE)
    b, bs = pad_to(b, 2, tn), pad_to(column_scales(b_scale, n), 2, tn)
    a_scale, bs = tpu_scales(a_scale, bs)
    np_ = b.shape[2]
    sq = pl.Squeezed()
    out = pl.pallas_call(
        lambda grp, *refs: tpu_tile_body(*refs, mxu_dtype=tpu_mxu_dtype(interpret)),
        out_shape=jax.ShapeDtypeStruct((r, np_), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(r // TILE, np_ // tn, k // (s * TILE)),
            in_specs=[
                pl.BlockSpec((TILE, s * TILE), lambda i, j, kk, grp: (i, kk)),
                pl.BlockSpec((TILE, TILE), lambda i, j, kk, grp: (i, jax.lax.div(kk * s, TILE))),
                pl.BlockSpec((sq, s * TILE, tn), lambda i, j, kk, grp: (grp[i], kk, j)),
                pl.BlockSpec((sq, 8, tn), lambda i, j, kk, grp: (grp[i], jax.lax.div(kk * s, 8), j)),
            ],
            out_specs=pl.BlockSpec((TILE, tn), lambda i, j, kk, grp: (i, j)),
            scratch_shapes=[pltpu.VMEM((TILE, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(block_group.astype(jnp.int32), a, a_scale, b, bs)
    return out[:, :n]


def _tpu_wgrad_body(grp_ref, at_ref, as_ref, b_ref, bs_ref, o_ref, *, mxu_dtype=jnp.bfloat16):
    """Grid (K, N, blocks): the output tile of the block's expert stays resident while the sorted
    blocks of that expert stream past; zeroed at its first block. Block i's scales: column i % 128 of
    A^T's [tk, 128] and row i % 8 of B's [8, tn] (lane-dense, as ``tpu_tile_body``'s)."""
    i = pl.program_id(2)

    @pl.when((i == 0) | (grp_ref[jnp.maximum(i - 1, 0)] != grp_ref[i]))
    def _():
        o_ref[...] = jnp.zeros_like(o_ref)

    a_s, b_s = pick(as_ref[...], jax.lax.rem(i, TILE), 1), pick(bs_ref[...], jax.lax.rem(i, 8), 0)
    o_ref[...] = promote(o_ref[...], at_ref[...], b_ref[...], a_s, b_s, mxu_dtype)


def fp8_gmm_wgrad_tpu(a, a_scale, b, b_scale, block_group, num_groups: int, interpret=False, tk=256, tn=256):
    r, k = a.shape
    n = b.shape[1]
    tk, tn = min(tk, -(-k // TILE) * TILE), min(tn, -(-n // TILE) * TILE)
    at, b = pad_to(a.T, 0, tk), pad_to(b, 1, tn)  # A^T [Kp, R]: its 128x1 tiles become rows
    ast, bs = tpu_scales(pad_to(a_scale.T, 0, tk), pad_to(b_scale, 1, tn))  # A^T's scales [Kp, NB]
    kp, np_ = at.shape[0], b.shape[1]
    sq = pl.Squeezed()
    out = pl.pallas_call(
        functools.partial(_tpu_wgrad_body, mxu_dtype=tpu_mxu_dtype(interpret)),
        out_shape=jax.ShapeDtypeStruct((num_groups, kp, np_), jnp.float32),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(kp // tk, np_ // tn, r // TILE),
            in_specs=[
                pl.BlockSpec((tk, TILE), lambda kk, j, i, grp: (kk, i)),
                pl.BlockSpec((tk, TILE), lambda kk, j, i, grp: (kk, jax.lax.div(i, TILE))),  # scales of 128 blocks
                pl.BlockSpec((TILE, tn), lambda kk, j, i, grp: (i, j)),
                pl.BlockSpec((8, tn), lambda kk, j, i, grp: (jax.lax.div(i, 8), j)),  # of 8 blocks
            ],
            out_specs=pl.BlockSpec((sq, tk, tn), lambda kk, j, i, grp: (grp[i], kk, j)),
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(block_group.astype(jnp.int32), at, ast, b, bs)
    return out[:, :k, :n]


# --- GPU kernels (Mosaic GPU, Hopper wgmma) ---------------------------------------------------------


def fp8_gmm_mgpu(a, a_scale, b, b_scale, block_group, out_dtype=jnp.bfloat16, interpret=False):
    r, k = a.shape
    n = b.shape[2]
    tm, tn = MGPU_TM, MGPU_TN
    bt = pad_to(b, 2, tn).swapaxes(1, 2)  # B^T per expert [G, N, K]: K-major for the 8-bit wgmma
    sa, (sb, b_blocks) = a_scale.T, mgpu_column_scales(b_scale, n, tn)  # [Kb, R], [G, Kb, N]
    np_ = bt.shape[1]

    def body(grp_gmem, a_gmem, sa_gmem, bt_gmem, sb_gmem, o_gmem):
        i = jax.lax.axis_index("m")
        g = grp_gmem[i * tm // TILE]  # the expert of this tile's 128-row block
        rows, cols = pl.ds(i * tm, tm), pl.ds(jax.lax.axis_index("n") * tn, tn)
        mgpu_tile(
            a_gmem.at[rows],
            sa_gmem.at[:, rows],
            bt_gmem.at[g, cols],
            sb_gmem.at[g, :, cols],
            k // TILE,
            0,
            o_gmem.at[rows, cols],
            b_blocks=b_blocks,
        )

    call = mgpu_kernel(body, (r, np_), out_dtype, (r // tm, np_ // tn), ("m", "n"), interpret)
    return call(block_group.astype(jnp.int32), a, sa, bt, sb)[:, :n]


def fp8_gmm_wgrad_mgpu(a, a_scale, b, b_scale, block_group, num_groups: int, interpret=False):
    r, k = a.shape
    n = b.shape[1]
    tm, tn = MGPU_TM, MGPU_TN
    at, sa = pad_to(a, 1, tm).T, pad_to(a_scale, 1, tm)  # A^T [K, R]: tokens (its contraction) fastest
    bt, sb = pad_to(b, 1, tn).T, pad_to(b_scale, 1, tn)  # B^T [N, R]
    kp, np_ = at.shape[0], bt.shape[0]
    groups = jnp.arange(num_groups)
    start = jnp.searchsorted(block_group, groups, side="left").astype(jnp.int32)
    count = jnp.searchsorted(block_group, groups, side="right").astype(jnp.int32) - start

    def body(start_gmem, count_gmem, at_gmem, sa_gmem, bt_gmem, sb_gmem, o_gmem):
        g = jax.lax.axis_index("g")
        first, steps = start_gmem[g], count_gmem[g]
        rows, cols = pl.ds(jax.lax.axis_index("m") * tm, tm), pl.ds(jax.lax.axis_index("n") * tn, tn)

        @pl.when(steps > 0)  # an expert without rows is left unwritten (the dispatch zeroes it)
        def _():
            mgpu_tile(
                at_gmem.at[rows],
                sa_gmem.at[:, rows],
                bt_gmem.at[cols],
                sb_gmem.at[:, cols],
                steps,
                first,
                o_gmem.at[g, rows, cols],
            )

    grid = (num_groups, kp // tm, np_ // tn)
    call = mgpu_kernel(body, (num_groups, kp, np_), jnp.float32, grid, ("g", "m", "n"), interpret)
    return call(start, count, at, sa, bt, sb)[:, :k, :n]


# --- GPU kernels (Triton backend) ------------------------------------------------------------------


def _gpu_gmm_body(grp_ref, a_ref, as_ref, b_ref, bs_ref, o_ref):
    g, cols = grp_ref[0], pl.ds(pl.program_id(1) * o_ref.shape[1], o_ref.shape[1])
    gpu_k_loop(a_ref, as_ref, lambda ks: b_ref[g, ks, cols], lambda kb: bs_ref[g, kb, cols], o_ref)


def fp8_gmm_gpu(a, a_scale, b, b_scale, block_group, out_dtype=jnp.bfloat16, interpret=False, tn=128):
    r, k = a.shape
    n = b.shape[2]
    tn = min(tn, max(16, pl.next_power_of_2(n)))
    bs = pad_to(column_scales(b_scale, n), 2, tn)
    b = pad_to(b, 2, tn)
    np_ = b.shape[2]
    out = pl.pallas_call(
        _gpu_gmm_body,
        out_shape=jax.ShapeDtypeStruct((r, np_), out_dtype),
        grid=(r // TILE, np_ // tn),
        in_specs=[
            pl.BlockSpec((1,), lambda i, j: (i,)),
            pl.BlockSpec((TILE, k), lambda i, j: (i, 0)),
            pl.BlockSpec((TILE, k // TILE), lambda i, j: (i, 0)),
            pl.no_block_spec,  # B [G, K, N]: the block's expert is read in the kernel
            pl.no_block_spec,
        ],
        out_specs=pl.BlockSpec((TILE, tn), lambda i, j: (i, j)),
        compiler_params=GPU_PARAMS,
        interpret=interpret,
    )(block_group.astype(jnp.int32), a, a_scale, b, bs)
    return out[:, :n]


def _gpu_wgrad_body(start_ref, end_ref, at_ref, as_ref, b_ref, bs_ref, o_ref):
    """One (tk, tn) tile of expert g: a loop over g's blocks, each one promotion (zero if none)."""
    g = pl.program_id(0)
    tk, tn = o_ref.shape
    rows, cols = pl.ds(pl.program_id(1) * tk, tk), pl.ds(pl.program_id(2) * tn, tn)

    def step(i, acc):
        blk = pl.ds(pl.multiple_of(i * TILE, TILE), TILE)
        return promote(
            acc, at_ref[rows, blk], b_ref[blk, cols], as_ref[rows, pl.ds(i, 1)], bs_ref[pl.ds(i, 1), cols], None
        )

    o_ref[...] = jax.lax.fori_loop(start_ref[g], end_ref[g], step, jnp.zeros((tk, tn), jnp.float32))


def fp8_gmm_wgrad_gpu(a, a_scale, b, b_scale, block_group, num_groups: int, interpret=False, tk=128, tn=128):
    r, k = a.shape
    n = b.shape[1]
    tk, tn = min(tk, max(16, pl.next_power_of_2(k))), min(tn, max(16, pl.next_power_of_2(n)))
    at, as_t = pad_to(a.T, 0, tk), pad_to(a_scale.T, 0, tk)  # A^T [Kp, R], its scales [Kp, NB]
    b, bs = pad_to(b, 1, tn), pad_to(b_scale, 1, tn)
    kp, np_ = at.shape[0], b.shape[1]
    groups = jnp.arange(num_groups)
    start = jnp.searchsorted(block_group, groups, side="left").astype(jnp.int32)
    end = jnp.searchsorted(block_group, groups, side="right").astype(jnp.int32)
    out = pl.pallas_call(
        _gpu_wgrad_body,
        out_shape=jax.ShapeDtypeStruct((num_groups, kp, np_), jnp.float32),
        grid=(num_groups, kp // tk, np_ // tn),
        in_specs=[pl.no_block_spec] * 6,
        out_specs=pl.BlockSpec((pl.Squeezed(), tk, tn), lambda g, i, j: (g, i, j)),
        compiler_params=GPU_PARAMS,
        interpret=interpret,
    )(start, end, at, as_t, b, bs)
    return out[:, :k, :n]


# --- dispatch --------------------------------------------------------------------------------------


def _check(a, b, block_group, scales, expect, out_dtype=jnp.float32, tiled_k=True):
    if a.dtype != E4M3 or b.dtype != E4M3:
        raise TypeError(f"fp8_gmm: operands must be float8_e4m3fn, got a {a.dtype}, b {b.dtype}")
    if a.ndim != 2 or a.shape[0] % TILE or (tiled_k and a.shape[1] % TILE):
        raise ValueError(f"fp8_gmm: a {a.shape} must be [128 x blocks, K]" + f" with K a multiple of {TILE}" * tiled_k)
    if block_group.shape != (a.shape[0] // TILE,) or not jnp.issubdtype(block_group.dtype, jnp.integer):
        raise ValueError(
            f"fp8_gmm: block_group {block_group.shape} {block_group.dtype} must be int [{a.shape[0] // TILE}]"
        )
    for name, s, shapes in zip(("a_scale", "b_scale"), scales, expect):
        if s.dtype != jnp.float32 or s.shape not in shapes:
            raise ValueError(
                f"fp8_gmm: {name} {s.shape} {s.dtype}: expected float32 of shape {' or '.join(map(str, shapes))}"
            )
    if jnp.dtype(out_dtype) not in OUT_DTYPES:
        raise TypeError(f"fp8_gmm: out_dtype must be bfloat16 or float32, got {jnp.dtype(out_dtype)}")


def fp8_gmm(a, a_scale, b, b_scale, block_group, out_dtype=jnp.bfloat16, impl="auto", platform=None):
    """out [R, N]: each 128-row block of ``a`` times its expert's ``b`` (module docstring)."""
    r, k = a.shape
    if b.ndim != 3 or b.shape[1] != k:
        raise ValueError(f"fp8_gmm: b {b.shape} must be [G, K={k}, N]")
    g, _, n = b.shape
    expect = [((r, k // TILE),), ((g, k // TILE, -(-n // TILE)), (g, k // TILE, n))]
    _check(a, b, block_group, (a_scale, b_scale), expect, out_dtype)
    platform = platform or target_platform()
    impl = resolve_impl(impl, "fp8", platform)
    if impl == "xla":
        return fp8_gmm_reference(a, a_scale, b, b_scale, block_group, out_dtype)
    kernel = {"mgpu": fp8_gmm_mgpu, "triton": fp8_gmm_gpu, "tpu": fp8_gmm_tpu}[kernel_for(platform)]
    run = functools.partial(kernel, out_dtype=out_dtype, interpret=impl == "interpret")
    return forward_only("fp8_gmm", run, a, a_scale, b, b_scale, block_group)


def fp8_gmm_wgrad(a, a_scale, b, b_scale, block_group, num_groups: int, impl="auto", platform=None):
    """out [G, K, N] fp32: per expert, the sum over its blocks of A_i^T B_i (module docstring)."""
    r, k = a.shape
    if b.ndim != 2 or b.shape[0] != r:
        raise ValueError(f"fp8_gmm_wgrad: b {b.shape} must be [R={r}, N]")
    expect = [((r // TILE, k),), ((r // TILE, b.shape[1]),)]
    _check(a, b, block_group, (a_scale, b_scale), expect, tiled_k=False)
    platform = platform or target_platform()
    impl = resolve_impl(impl, "fp8", platform)
    if impl == "xla":
        return fp8_gmm_wgrad_reference(a, a_scale, b, b_scale, block_group, num_groups)
    kernel = {"mgpu": fp8_gmm_wgrad_mgpu, "triton": fp8_gmm_wgrad_gpu, "tpu": fp8_gmm_wgrad_tpu}[kernel_for(platform)]
    run = functools.partial(kernel, num_groups=num_groups, interpret=impl == "interpret")
    out = forward_only("fp8_gmm_wgrad", run, a, a_scale, b, b_scale, block_group)
    present = (
        jnp.zeros(num_groups, bool).at[block_group].set(True)
    )  # the TPU / Mosaic GPU kernels never write empty experts
    return jnp.where(present[:, None, None], out, 0.0)
