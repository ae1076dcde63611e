"""Block-scaled FP8 GEMM with fp32 promotion per 128-deep K block (DeepSeek-V3 §3.3.2).

    C = sum_kb (A_kb B_kb) a_s[:, kb] b_s[kb, :]     (A_kb B_kb: e4m3 x e4m3 -> fp32, 128-deep)

A [M, K] e4m3 with a_s [M, K/128] (1x128 tiles); B [K, N] e4m3 with b_s [K/128, N/128] (128x128
blocks) or [K/128, N] (128x1 tiles: the wgrad operand). Each 128-deep partial sum starts in a fresh
fp32 accumulator and is scaled there ("promotion"), so no rounding of a long fp8 accumulation.

Implementations side by side, one dispatch (``fp8_gemm``):
- ``fp8_gemm_reference``: plain jnp, a scan over K blocks; the CPU fallback (``xla``).
- ``fp8_gemm_tpu``: Mosaic TPU kernel, grid (M, N, K) tiles, fp32 VMEM accumulator. Tiles are
  loaded as e4m3 (half the HBM bytes of bf16) and fed to the MXU as bf16 (exact for e4m3; v5e/v5p
  have no fp8 MXU and v6e runs fp8 at the bf16 rate).
- ``fp8_gemm_mgpu``: Mosaic GPU kernel for Hopper, warp-specialized: a TMA warpgroup streams e4m3
  tiles and scales, two compute warpgroups run one wgmma per 128-deep block into a fresh fp32
  accumulator and promote it in registers (DeepGEMM's scheme).
- ``fp8_gemm_gpu``: Triton-backend Pallas kernel (GPUs without wgmma): e4m3 operands straight into
  ``tl.dot``, fp32 partial per K block, promoted in registers.
``impl``: ``auto`` (pallas on TPU/GPU, xla on CPU), ``pallas``, ``interpret`` (the backend's
kernel in Pallas interpret mode; the TPU kernel on CPU), ``xla``. ``DSJAX_FP8_IMPL`` overrides it.
On GPU, ``pallas`` is the Mosaic GPU kernel on Hopper (sm_90) and the Triton kernel elsewhere.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.platform import forward_only, kernel_for, resolve_impl, target_platform
from pallas_kernels.quant import E4M3, TILE, pad_to

OUT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


def promote(acc, a, b, a_s, b_s, mxu_dtype=jnp.float32):
    """acc + (a b) a_s b_s: one 128-deep K block's fp32 partial sum, scaled by both operands."""
    if mxu_dtype is not None:
        a, b = a.astype(mxu_dtype), b.astype(mxu_dtype)
    return acc + jnp.matmul(a, b, preferred_element_type=jnp.float32) * a_s * b_s


def column_scales(b_scale, n: int):
    """B's scales per (K block, column): 128x128 block scales repeated over their 128 columns."""
    if b_scale.shape[-1] == n:
        return b_scale
    return jnp.repeat(b_scale, TILE, axis=-1)[..., :n]


def mgpu_column_scales(b_scale, n: int, tn: int):
    """B's scales for ``mgpu_tile``: per column, padded to whole ``tn`` tiles, and ``b_blocks``: whether
    they are 128x128 block scales with every tile inside one block column (one number per K step)."""
    return pad_to(column_scales(b_scale, n), -1, tn), b_scale.shape[-1] != n and TILE % tn == 0


# --- plain jnp reference (the CPU fallback) -------------------------------------------------------


def fp8_gemm_reference(a, a_scale, b, b_scale, out_dtype=jnp.bfloat16):
    m, k = a.shape
    n = b.shape[1]
    kb = k // TILE
    blocks = (
        a.reshape(m, kb, TILE).transpose(1, 0, 2),  # [Kb, M, 128]
        b.reshape(kb, TILE, n),
        a_scale.T[:, :, None],  # [Kb, M, 1]
        column_scales(b_scale, n)[:, None, :],  # [Kb, 1, N]
    )
    first, rest = jax.tree.map(lambda t: t[0], blocks), jax.tree.map(lambda t: t[1:], blocks)
    # The carry starts from the first block's product, not zeros: it then varies over the axes of
    # any enclosing shard_map as the operands do (a constant carry fails check_vma).
    acc, _ = jax.lax.scan(lambda acc, blk: (promote(acc, *blk), None), promote(0.0, *first), rest)
    return acc.astype(out_dtype)


# --- Mosaic TPU kernel ----------------------------------------------------------------------------


def tpu_mxu_dtype(interpret: bool):
    """The TPU kernels' MXU operand type: bf16 (exact for e4m3). Interpret mode on CPU uses fp32, the
    same values: XLA:CPU failed on the interpreted wgrad ("Unsupported element type for DotThunk:
    BF16 x BF16 = F32") once its operands came from the interpreted quantizer."""
    return jnp.float32 if interpret else jnp.bfloat16


def pick(v, idx, axis: int):
    """Entry ``idx`` (traced) along ``axis`` of a 2-D value, keeping the dim (size 1), by an exact
    one-hot select rather than a dynamic slice. The TPU kernels read scales lane-dense and pick one
    K block's this way: an [M, K/128] array read as [M, 1] columns would be laid out padded to 128
    lanes, 128x its size in HBM."""
    hit = jax.lax.broadcasted_iota(jnp.int32, v.shape, axis) == idx
    return jnp.sum(jnp.where(hit, v, 0.0), axis=axis, keepdims=True)


def tpu_tile_body(a_ref, as_ref, b_ref, bs_ref, o_ref, acc_ref, *, mxu_dtype=jnp.bfloat16):
    """One (tm, tn) output tile, one tk-deep step of the K grid axis = tk / 128 promotions. as_ref:
    A's scales for 128 K blocks [tm, 128]; bs_ref: B's for 8 K blocks [8, tn] (``tpu_scales``)."""
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    acc, a_scales, b_scales = acc_ref[...], as_ref[...], bs_ref[...]
    steps = a_ref.shape[1] // TILE  # static: the 128-deep blocks inside this K step
    for j in range(steps):
        ks, kb = pl.ds(j * TILE, TILE), k * steps + j
        a_s, b_s = pick(a_scales, jax.lax.rem(kb, TILE), 1), pick(b_scales, jax.lax.rem(kb, 8), 0)
        acc = promote(acc, a_ref[:, ks], b_ref[ks, :], a_s, b_s, mxu_dtype)
    acc_ref[...] = acc

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc.astype(o_ref.dtype)


def tpu_scales(a_scale, b_col_scales):
    """A's [M, Kb] and B's per-column [..., Kb, N] scales padded for the blocks ``tpu_tile_body``
    reads: A's K blocks to a multiple of 128 (lanes), B's to a multiple of 8 (sublanes)."""
    return pad_to(a_scale, 1, TILE), pad_to(b_col_scales, -2, 8)


def k_step(kb: int) -> int:
    """128-deep blocks per K grid step: 4, 2 or 1, whichever divides K / 128."""
    return next(s for s in (4, 2, 1) if kb % s == 0)


def fp8_gemm_tpu(a, a_scale, b, b_scale, out_dtype=jnp.bfloat16, interpret=False, tm=256, tn=256):
    m, k = a.shape
    n = b.shape[1]
    s = k_step(k // TILE)
    tm, tn = min(tm, -(-m // 32) * 32), min(tn, -(-n // TILE) * TILE)  # e4m3 tiles are (32, 128)
    a, a_scale = pad_to(a, 0, tm), pad_to(a_scale, 0, tm)
    b, bs = pad_to(b, 1, tn), pad_to(column_scales(b_scale, n), 1, tn)
    a_scale, bs = tpu_scales(a_scale, bs)
    mp, np_ = a.shape[0], b.shape[1]
    out = pl.pallas_call(
        functools.partial(tpu_tile_body, mxu_dtype=tpu_mxu_dtype(interpret)),
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        grid=(mp // tm, np_ // tn, k // (s * TILE)),
        in_specs=[
            pl.BlockSpec((tm, s * TILE), lambda i, j, kk: (i, kk)),
            pl.BlockSpec((tm, TILE), lambda i, j, kk: (i, jax.lax.div(kk * s, TILE))),  # scales of 128 K blocks
            pl.BlockSpec((s * TILE, tn), lambda i, j, kk: (kk, j)),
            pl.BlockSpec((8, tn), lambda i, j, kk: (jax.lax.div(kk * s, 8), j)),  # of 8 K blocks
        ],
        out_specs=pl.BlockSpec((tm, tn), lambda i, j, kk: (i, j)),
        scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(a, a_scale, b, bs)
    return out[:m, :n]


# --- GPU kernel (Mosaic GPU, Hopper wgmma) ---------------------------------------------------------

MGPU_WG_M, MGPU_WGS = 64, 2  # rows per compute warpgroup (wgmma's M), compute warpgroups per CTA
MGPU_TM, MGPU_TN, MGPU_STAGES = MGPU_WG_M * MGPU_WGS, 128, 4  # CTA tile, TMA ring depth; untuned (no GPU yet)


def mgpu_swizzled(cols: int, dtype):
    """SMEM layout transforms for a [rows, cols] tile: 8-row tiles, the widest swizzle that fits."""
    bits = jnp.dtype(dtype).itemsize * 8
    swizzle = plgpu.find_swizzle(cols * bits)
    return plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle)


def mgpu_tile(a_rows, sa_rows, bt_cols, sb_cols, steps, first, o_gmem, stages=MGPU_STAGES, b_blocks=False):
    """One (MGPU_TM, tn) output tile on Hopper, warp-specialized (DeepGEMM's scheme): a memory
    warpgroup streams step j's operands by TMA into a ring of ``stages`` SMEM slots -- A's [TM, 128]
    and B^T's [tn, 128] column blocks ``first + j`` (8-bit wgmma takes both K-major) and their
    scales, rows ``first + j`` of s_a [Kb, TM] and s_b [Kb, tn] -- while two compute warpgroups,
    64 rows each, multiply every 128-deep block into a fresh fp32 accumulator and promote it in
    registers: acc += part * s_a[:, None] * s_b[None, :]. One warpgroup's promotion overlaps the
    other's wgmma. ``steps`` may be traced (the wgrad's expert has a dynamic block count).
    ``b_blocks``: B has 128x128 block scales and the tile lies in one block column (tn <= 128), so
    s_b is one number per step and the promotion one FMA per element: acc += part * (s_a s_b)[:, None]."""
    tn = bt_cols.shape[0]
    wg = jax.lax.axis_index("wg")
    wg_rows = pl.ds(wg * MGPU_WG_M, MGPU_WG_M)
    row, col = plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)

    def step(_, a_smem, sa_smem, bt_smem, sb_smem, acc):
        s_a = plgpu.load(sa_smem.at[0, wg_rows], layout=row, optimized=False)  # before the wgmma: its latency hides
        s_b = sb_smem[0, 0] if b_blocks else plgpu.load(sb_smem.at[0], layout=col, optimized=False)

        def mma(part_ref):
            plgpu.wgmma(part_ref, a_smem.at[wg_rows], bt_smem.T)
            return part_ref[...]  # waits for the wgmma

        part = pl.run_scoped(mma, plgpu.ACC((MGPU_WG_M, tn), jnp.float32))
        if b_blocks:
            return acc + part * jax.lax.broadcast_in_dim(s_a * s_b, part.shape, [0])
        return acc + part * jax.lax.broadcast_in_dim(s_a, part.shape, [0]) * jax.lax.broadcast_in_dim(
            s_b, part.shape, [1]
        )

    def scoped(o_smem):
        def compute(pipeline):  # the compute warpgroups: the K loop, then the epilogue (registers -> SMEM -> TMA)
            acc = pipeline(plgpu.layout_cast(jnp.zeros((MGPU_WG_M, tn), jnp.float32), plgpu.Layout.WGMMA))
            o_smem[wg] = acc.astype(o_smem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem.at[wg], o_gmem.at[wg_rows])
            plgpu.wait_smem_to_gmem(0)

        operand = lambda rows: plgpu.BlockSpec(
            (rows, TILE), lambda j: (0, first + j), transforms=mgpu_swizzled(TILE, E4M3)
        )  # noqa: E731
        scales = lambda cols: plgpu.BlockSpec((1, cols), lambda j: (first + j, 0))  # noqa: E731
        plgpu.emit_pipeline_warp_specialized(
            step,
            grid=(steps,),
            memory_registers=40,
            wg_axis="wg",
            num_compute_wgs=MGPU_WGS,
            in_specs=[operand(MGPU_TM), scales(MGPU_TM), operand(tn), scales(tn)],
            max_concurrent_steps=stages,
            compute_context=compute,
        )(a_rows, sa_rows, bt_cols, sb_cols)

    out_tile = plgpu.SMEM((MGPU_WGS, MGPU_WG_M, tn), o_gmem.dtype, transforms=mgpu_swizzled(tn, o_gmem.dtype))
    pl.run_scoped(scoped, out_tile, collective_axes="wg")


def mgpu_kernel(body, out_shape, out_dtype, grid, names, interpret):
    """``plgpu.kernel`` over ``grid``, 2 compute + 1 memory warpgroups per CTA. ``interpret``: True for
    GPU interpret mode (on CPU), or its ``plgpu.InterpretGPUParams`` (``detect_races=True``: the tests)."""
    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct(out_shape, out_dtype),
        grid=grid,
        grid_names=names,
        num_threads=MGPU_WGS + 1,
        thread_name="wg",
        interpret=plgpu.InterpretGPUParams() if interpret is True else interpret or None,
    )


def fp8_gemm_mgpu(a, a_scale, b, b_scale, out_dtype=jnp.bfloat16, interpret=False, tn=MGPU_TN, stages=MGPU_STAGES):
    m, k = a.shape
    n = b.shape[1]
    tm = MGPU_TM
    a, sa = pad_to(a, 0, tm), pad_to(a_scale, 0, tm).T  # a_s as [Kb, M]: a step's scales contiguous
    bt, (sb, b_blocks) = pad_to(b, 1, tn).T, mgpu_column_scales(b_scale, n, tn)  # B^T [N, K]: K-major
    mp, np_ = a.shape[0], bt.shape[0]

    def body(a_gmem, sa_gmem, bt_gmem, sb_gmem, o_gmem):
        rows = pl.ds(jax.lax.axis_index("m") * tm, tm)
        cols = pl.ds(jax.lax.axis_index("n") * tn, tn)
        mgpu_tile(
            a_gmem.at[rows],
            sa_gmem.at[:, rows],
            bt_gmem.at[cols],
            sb_gmem.at[:, cols],
            k // TILE,
            0,
            o_gmem.at[rows, cols],
            stages,
            b_blocks,
        )

    out = mgpu_kernel(body, (mp, np_), out_dtype, (mp // tm, np_ // tn), ("m", "n"), interpret)(a, sa, bt, sb)
    return out[:m, :n]


# --- GPU kernel (Triton backend) ------------------------------------------------------------------


def gpu_k_loop(a_ref, as_ref, b_at, bs_at, o_ref):
    """One (tm, tn) output tile: a loop over K blocks, each promoted into the fp32 accumulator.
    ``b_at(ks)`` / ``bs_at(kb)`` load B's [128, tn] block and its scale row for K block kb."""

    def step(kb, acc):
        ks = pl.ds(pl.multiple_of(kb * TILE, TILE), TILE)
        return promote(acc, a_ref[:, ks], b_at(ks), as_ref[:, pl.ds(kb, 1)], bs_at(pl.ds(kb, 1)), None)

    acc = jax.lax.fori_loop(0, as_ref.shape[1], step, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _gpu_body(a_ref, as_ref, b_ref, bs_ref, o_ref):
    gpu_k_loop(a_ref, as_ref, lambda ks: b_ref[ks, :], lambda kb: bs_ref[kb, :], o_ref)


GPU_PARAMS = pltriton.CompilerParams(num_warps=8, num_stages=4)  # untuned (no GPU to tune on)


def fp8_gemm_gpu(a, a_scale, b, b_scale, out_dtype=jnp.bfloat16, interpret=False, tm=128, tn=128):
    m, k = a.shape
    n = b.shape[1]
    kb = k // TILE
    tm, tn = min(tm, max(16, pl.next_power_of_2(m))), min(tn, max(16, pl.next_power_of_2(n)))
    a, a_scale = pad_to(a, 0, tm), pad_to(a_scale, 0, tm)
    bs = pad_to(column_scales(b_scale, n), 1, tn)
    b = pad_to(b, 1, tn)
    mp, np_ = a.shape[0], b.shape[1]
    out = pl.pallas_call(
        _gpu_body,
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        grid=(mp // tm, np_ // tn),
        in_specs=[
            pl.BlockSpec((tm, k), lambda i, j: (i, 0)),
            pl.BlockSpec((tm, kb), lambda i, j: (i, 0)),
            pl.BlockSpec((k, tn), lambda i, j: (0, j)),
            pl.BlockSpec((kb, tn), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((tm, tn), lambda i, j: (i, j)),
        compiler_params=GPU_PARAMS,
        interpret=interpret,
    )(a, a_scale, b, bs)
    return out[:m, :n]


# --- dispatch -------------------------------------------------------------------------------------


def check_operands(a, a_scale, b, b_scale, out_dtype):
    if a.dtype != E4M3 or b.dtype != E4M3:
        raise TypeError(f"fp8_gemm: operands must be float8_e4m3fn, got a {a.dtype}, b {b.dtype}")
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"fp8_gemm: need a [M, K] and b [K, N], got {a.shape} and {b.shape}")
    m, k = a.shape
    n = b.shape[1]
    if k % TILE:
        raise ValueError(f"fp8_gemm: K={k} must be a multiple of {TILE} (quantize pads it)")
    if a_scale.dtype != jnp.float32 or b_scale.dtype != jnp.float32:
        raise TypeError(f"fp8_gemm: scales must be float32, got {a_scale.dtype}, {b_scale.dtype}")
    if a_scale.shape != (m, k // TILE):
        raise ValueError(f"fp8_gemm: a_scale {a_scale.shape} != (M, K/128) = {(m, k // TILE)}")
    if b_scale.shape not in ((k // TILE, -(-n // TILE)), (k // TILE, n)):
        raise ValueError(f"fp8_gemm: b_scale {b_scale.shape} is neither (K/128, N/128) nor (K/128, N) for b {b.shape}")
    if jnp.dtype(out_dtype) not in OUT_DTYPES:
        raise TypeError(f"fp8_gemm: out_dtype must be bfloat16 or float32, got {jnp.dtype(out_dtype)}")


def fp8_gemm(a, a_scale, b, b_scale, out_dtype=jnp.bfloat16, impl: str = "auto", platform: str | None = None):
    """C [M, N] = A B with block scales (module docstring). ``platform`` defaults to
    ``jax.default_backend()`` (set it to lower for another platform, e.g. ``"tpu"`` on CPU)."""
    check_operands(a, a_scale, b, b_scale, out_dtype)
    platform = platform or target_platform()
    impl = resolve_impl(impl, "fp8", platform)
    if impl == "xla":
        return fp8_gemm_reference(a, a_scale, b, b_scale, out_dtype)
    kernel = {"mgpu": fp8_gemm_mgpu, "triton": fp8_gemm_gpu, "tpu": fp8_gemm_tpu}[kernel_for(platform)]
    run = functools.partial(kernel, out_dtype=out_dtype, interpret=impl == "interpret")
    return forward_only("fp8_gemm", run, a, a_scale, b, b_scale)
