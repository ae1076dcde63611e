"""Grouped matmul for dropless MoE: rows sorted by expert, out[g-rows] = lhs[g-rows] @ rhs[g].

One dispatch, ``grouped_matmul``, over the implementations:
- ``ragged_dot``: ``jax.lax.ragged_dot``, XLA's grouped GEMM (native on TPU). On CPU XLA lowers it
  to work over every group, so its cost grows with the number of experts.
- ``rows``: plain jnp, each row times a gathered copy of its group's matrix; for a handful of rows
  (decoding) it reads only the experts in use.
- ``blocked``: plain jnp. Each group is padded to a multiple of a row block, every block then
  belongs to one expert, and one batched matmul multiplies each block by its expert's weight.
  Cost grows with rows (tokens x top-k) plus at most one partial block per expert.
- ``fp8`` given: ``gmm_fp8``, V3's FP8 recipe on the 128-row-block layout (``pallas_kernels.fp8_gmm``),
  whatever ``impl`` says.
- ``rhs`` stored in FP8 (``Fp8Weight``, inference): ``gmm_fp8_stored``.
"""

import functools

import jax
import jax.numpy as jnp

from dsjax.model.fp8 import Fp8Recipe, Fp8Weight, gathered_blocks, like_primal
from pallas_kernels.fp8_gmm import fp8_gmm, fp8_gmm_wgrad
from pallas_kernels.platform import target_platform
from pallas_kernels.quant import GRAD_AMAX_MIN, TILE, dequantize_tiles, quantize_blocks, quantize_tiles


def block_rows(m: int, num_groups: int) -> int:
    """Rows per block: a power of two in [8, 128] leaving padding (<= one block per group) <= m/2."""
    b = 128
    while b > 8 and num_groups * b > m // 2:
        b //= 2
    return b


def blocked_layout(group_sizes, m: int, b: int):
    """Each group padded to whole b-row blocks: (row -> padded position [m], number of blocks, each
    block's group [blocks], sorted; trailing all-padding blocks count as the last group)."""
    g = group_sizes.shape[0]
    num_blocks = -(-m // b) + g  # sum_g ceil(size_g / b) can never exceed this
    padded = -(-group_sizes // b) * b
    pad_end = jnp.cumsum(padded)
    row_group = _row_group(group_sizes, m)
    rank_in_group = jnp.arange(m) - (jnp.cumsum(group_sizes) - group_sizes)[row_group]
    dest = (pad_end - padded)[row_group] + rank_in_group
    block_group = jnp.minimum(jnp.searchsorted(pad_end, jnp.arange(num_blocks) * b, side="right"), g - 1)
    return dest, num_blocks, block_group


def gmm_blocked(lhs, rhs, group_sizes):
    """lhs [m, k] sorted by group, rhs [g, k, n], group_sizes [g] (sum = m) -> [m, n]."""
    m, k = lhs.shape
    g, _, n = rhs.shape
    b = block_rows(m, g)
    dest, num_blocks, block_group = blocked_layout(group_sizes, m, b)
    x = jnp.zeros((num_blocks * b, k), lhs.dtype).at[dest].set(lhs, unique_indices=True)
    y = jnp.einsum("bmk,bkn->bmn", x.reshape(num_blocks, b, k), rhs[block_group])
    return y.reshape(num_blocks * b, n)[dest]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def gmm_fp8(lhs, rhs, group_sizes, impl: str = "auto", pow2: bool = False, gather: tuple[str, int] | None = None):
    """FP8 grouped matmul, V3's recipe per expert (``dsjax.model.fp8``): groups padded to 128-row blocks;
    forward / dgrad: 1x128 tiles x 128x128 blocks (``fp8_gmm``), wgrad: 128x1 tiles (``fp8_gmm_wgrad``).

    ``gather`` (axis, dim), inside a shard_map: rhs [g, K, N] is this device's FSDP slice along
    ``dim`` (1: K, 2: N) of a weight split over mesh axis ``axis``. The weight is gathered already
    quantized (``gathered_blocks``: e4m3, not fp32) and its fp32 gradient reduce-scattered back to the
    slice, as FSDP does; forward and backward each gather once."""
    return _gmm_fp8_fwd(lhs, rhs, group_sizes, impl, pow2, gather)[0]


def _weight_blocks(rhs, pow2, gather):
    return quantize_blocks(rhs, pow2) if gather is None else gathered_blocks(rhs, gather[0], gather[1] - rhs.ndim, pow2)


def _gmm_fp8_fwd(lhs, rhs, group_sizes, impl, pow2, gather):
    qw, sw = _weight_blocks(rhs, pow2, gather)
    n = rhs.shape[2] * (jax.lax.axis_size(gather[0]) if gather and gather[1] == 2 else 1)
    y, x, dest, block_group = _gmm_blocks(lhs, qw, sw, group_sizes, impl, pow2)
    return y[:, :n], (x, rhs, dest, block_group)


def _gmm_blocks(lhs, qw, sw, group_sizes, impl, pow2):
    """The FP8 forward: each group's rows padded to 128-row blocks, in 1x128 tiles, times its
    expert's e4m3 blocks qw [g, Kp, Np] (scales sw). Returns (y [m, Np], padded rows, layout)."""
    dest, num_blocks, block_group = blocked_layout(group_sizes, lhs.shape[0], TILE)
    x = jnp.zeros((num_blocks * TILE, lhs.shape[1]), lhs.dtype).at[dest].set(lhs, unique_indices=True)
    qx, sx = quantize_tiles(x, -1, pow2, impl=impl)
    return fp8_gmm(qx, sx, qw, sw, block_group, lhs.dtype, impl)[dest], x, dest, block_group


def _gmm_fp8_bwd(impl, pow2, gather, res, dy):
    x, rhs, dest, block_group = res
    g = jnp.zeros((x.shape[0], dy.shape[1]), dy.dtype).at[dest].set(dy, unique_indices=True)
    qw, sw = _weight_blocks(rhs, pow2, gather)
    qg, sg = quantize_tiles(g, -1, pow2, GRAD_AMAX_MIN, impl)
    dx = fp8_gmm(qg, sg, qw.swapaxes(1, 2), sw.swapaxes(1, 2), block_group, x.dtype, impl)[dest, : x.shape[1]]
    qxt, sxt = quantize_tiles(x, 0, pow2, impl=impl)
    qgt, sgt = quantize_tiles(g, 0, pow2, GRAD_AMAX_MIN, impl)
    dw = fp8_gmm_wgrad(qxt, sxt, qgt, sgt, block_group, rhs.shape[0], impl)[:, : x.shape[1], : dy.shape[1]]
    if gather is not None:  # the slice's share of every device's partial dW, summed in fp32
        dw = jax.lax.psum_scatter(dw, gather[0], scatter_dimension=gather[1], tiled=True)
    return like_primal(dx, x), like_primal(dw.astype(rhs.dtype), rhs), None  # x: lhs padded, same axes


gmm_fp8.defvjp(_gmm_fp8_fwd, _gmm_fp8_bwd)


def gmm_rows(lhs, rhs, group_sizes):
    """Each row times its own group's matrix: reads only the groups in use (decode: few rows)."""
    return jnp.einsum("mk,mkn->mn", lhs, rhs[_row_group(group_sizes, lhs.shape[0])])


def _row_group(group_sizes, m: int):
    return jnp.repeat(jnp.arange(group_sizes.shape[0]), group_sizes, total_repeat_length=m)


def gmm_fp8_stored(lhs, rhs: Fp8Weight, group_sizes, impl: str = "auto", pow2: bool = False):
    """FP8 inference: rows times experts stored in e4m3 blocks, activations in 1x128 tiles. No more
    rows than groups (decoding): each row times its own expert, dequantized (reads only the experts
    in use); else the FP8 grouped GEMM on the stored blocks (``gmm_fp8``'s forward)."""
    m, k = lhs.shape
    if m > rhs.shape[0]:
        return _gmm_blocks(lhs, rhs.padded(), rhs.scale_inv, group_sizes, impl, pow2)[0][:, : rhs.shape[2]]
    x = dequantize_tiles(*quantize_tiles(lhs, -1, pow2, impl=impl))[:, :k]
    w = jax.tree.map(lambda a: a[_row_group(group_sizes, m)], rhs).dequantize()
    return jnp.einsum("mk,mkn->mn", x, w, precision="highest").astype(lhs.dtype)


def gmm_ragged(lhs, rhs, group_sizes):
    return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32))


IMPLS = {"ragged_dot": gmm_ragged, "blocked": gmm_blocked, "rows": gmm_rows}


def grouped_matmul(lhs, rhs, group_sizes, impl: str = "auto", fp8: Fp8Recipe | None = None, gather=None):
    """Dispatch. ``auto``: ``ragged_dot`` on TPU (native grouped GEMM); elsewhere ``rows`` when there
    are no more rows than groups (decoding), else ``blocked``. ``rhs`` an ``Fp8Weight``: ``gmm_fp8_stored``.
    ``gather`` (FP8 training only): rhs is an FSDP slice, gathered in e4m3 by ``gmm_fp8``."""
    if isinstance(rhs, Fp8Weight):
        return gmm_fp8_stored(lhs, rhs, group_sizes, *(fp8 or Fp8Recipe()))
    if fp8 is not None:  # V3's FP8 recipe (ModelConfig.fp8), its kernels and scales as fp8 says
        return gmm_fp8(lhs, rhs, group_sizes, *fp8, gather)
    if gather is not None:
        raise ValueError("grouped_matmul: gather is for the FP8 recipe; gather other weights before the call")
    if impl == "auto":
        if target_platform() == "tpu":
            impl = "ragged_dot"
        else:
            impl = "rows" if lhs.shape[0] <= rhs.shape[0] else "blocked"
    if impl not in IMPLS:
        raise ValueError(f"grouped_matmul impl={impl!r}: expected auto, {', '.join(IMPLS)}")
    return IMPLS[impl](lhs, rhs, group_sizes)
