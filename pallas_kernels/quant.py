"""E4M3 quantization with fine-grained scales (DeepSeek-V3 §3.3.2).

    s = max(amax, 1e-4) / 448,   q = e4m3(x / s),   x ~= q s        (amax over one tile or block)

Activations get one scale per 1x128 tile along the contracted dim (``quantize_tiles(x)``), the
wgrad operand per 128x1 tile (``quantize_tiles(x, axis=0)``), weights per 128x128 block
(``quantize_blocks``). A tiled dim is zero-padded to a multiple of 128 and the padded arrays are
returned (zeros quantize to exact zeros); callers slice the GEMM output back.

Tiles, two implementations behind ``quantize_tiles``'s ``impl`` (the FP8 GEMMs' dispatch):
- ``quantize_tiles_reference``: plain jnp (CPU, GPU -- where XLA fuses it into one read of x and one
  write of q -- and anything not 2-D).
- ``quantize_tiles_tpu``: Mosaic TPU kernel for 2-D x, one pass over x in its own layout. XLA's TPU
  layouts tile the last two dims by (8, 128): the jnp version's [..., K/128, 128] view and the
  transposes for 128x1 tiles are relayout copies of x in fp32 (1.2 GiB each for 45056 x 7168 routed
  rows in the 671B plan), which the kernel never makes.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.platform import forward_only, kernel_for, resolve_impl, target_platform

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0  # largest finite e4m3fn value
AMAX_MIN = 1e-4  # amax clamp (weights, activations): an all-zero tile gets a finite scale
# Gradients of a mean loss are mostly far below 1e-4 (tiny config: 73% of dy rows); clamping them
# at 1e-4 would squeeze them into e4m3's subnormals. Their floor only keeps s a normal fp32.
GRAD_AMAX_MIN = E4M3_MAX * 2.0**-126
TILE = 128


def scale_from_amax(amax, pow2: bool = False, amax_min: float = AMAX_MIN):
    """s = max(amax, amax_min) / 448; ``pow2`` rounds s up to a power of two (UE8M0 scales, V3.1)."""
    s = jnp.maximum(amax.astype(jnp.float32), amax_min) / E4M3_MAX
    if not pow2:
        return s
    # s is a positive normal float: adding a mantissa's worth of ones carries into the exponent
    # unless the mantissa is zero; clearing the mantissa then leaves the next power of two (or s)
    bits = jax.lax.bitcast_convert_type(s, jnp.int32)
    return jax.lax.bitcast_convert_type((bits + 0x7FFFFF) & ~0x7FFFFF, jnp.float32)


def to_e4m3(x, s):
    """e4m3(x / s), clipped to +-448 (x / s can round a hair above amax / s)."""
    return jnp.clip(x / s, -E4M3_MAX, E4M3_MAX).astype(E4M3)


def block_count(n: int) -> int:
    """Scale tiles or blocks along a dim of n elements: ceil(n / 128)."""
    return -(-n // TILE)


def pad_to(x, axis: int, multiple: int = TILE):
    pad = -x.shape[axis] % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def quantize_tiles(
    x, axis: int = -1, pow2: bool = False, amax_min: float = AMAX_MIN, impl: str = "auto", platform: str | None = None
):
    """Scale per 128 consecutive elements along ``axis``: x [..., K, ...] -> (q e4m3 with K padded
    to Kp, s fp32 with K replaced by Kp / 128). 2-D x [M, K]: axis -1 = 1x128 tiles (q [M, Kp],
    s [M, Kp/128]); axis 0 = 128x1 tiles (q [Mp, K], s [Mp/128, K]). Gradients: ``GRAD_AMAX_MIN``.
    ``impl`` as the FP8 GEMMs' (``auto``: the TPU kernel on TPU for 2-D x, jnp elsewhere)."""
    platform = platform or target_platform()
    impl = resolve_impl(impl, "fp8", platform)
    if x.ndim == 2 and impl != "xla" and kernel_for(platform) == "tpu":
        interpret = impl == "interpret"
        run = functools.partial(quantize_tiles_tpu, axis=axis % 2, pow2=pow2, amax_min=amax_min, interpret=interpret)
        return forward_only("quantize_tiles", run, x)
    return quantize_tiles_reference(x, axis, pow2, amax_min)


def quantize_tiles_reference(x, axis: int = -1, pow2: bool = False, amax_min: float = AMAX_MIN):
    x = jnp.moveaxis(pad_to(x.astype(jnp.float32), axis), axis, -1)
    t = x.reshape(*x.shape[:-1], -1, TILE)
    s = scale_from_amax(jnp.max(jnp.abs(t), axis=-1), pow2, amax_min)
    q = to_e4m3(t, s[..., None]).reshape(x.shape)
    return jnp.moveaxis(q, -1, axis), jnp.moveaxis(s, -1, axis)


# --- Mosaic TPU kernel ----------------------------------------------------------------------------

TPU_BLOCK_ELEMS = 1 << 20  # x elements per grid step: 2 MiB of bf16 x + 1 MiB of q, double-buffered 6 MiB


def _tpu_rows_body(x_ref, q_ref, s_ref, *, pow2, amax_min):
    """1x128 tiles of a (tm, Kp) row block: the scales gathered in a (tm, Kp/128) value, stored once."""
    lane = jax.lax.broadcasted_iota(jnp.int32, s_ref.shape, 1)
    scales = jnp.zeros(s_ref.shape, jnp.float32)
    for j in range(q_ref.shape[1] // TILE):
        t = x_ref[:, j * TILE : (j + 1) * TILE].astype(jnp.float32)
        s = scale_from_amax(jnp.max(jnp.abs(t), axis=1, keepdims=True), pow2, amax_min)
        q_ref[:, j * TILE : (j + 1) * TILE] = to_e4m3(t, s)
        scales = jnp.where(lane == j, s, scales)
    s_ref[...] = scales


def _tpu_cols_body(x_ref, q_ref, s_ref, *, pow2, amax_min):
    """128x1 tiles of an (r * 128, tk) block: row r of the scales per 128 rows of x."""
    for r in range(s_ref.shape[0]):
        t = x_ref[r * TILE : (r + 1) * TILE, :].astype(jnp.float32)
        s = scale_from_amax(jnp.max(jnp.abs(t), axis=0, keepdims=True), pow2, amax_min)
        q_ref[r * TILE : (r + 1) * TILE, :] = to_e4m3(t, s)
        s_ref[r : r + 1, :] = s


def quantize_tiles_tpu(x, axis: int = 1, pow2: bool = False, amax_min: float = AMAX_MIN, interpret: bool = False):
    """2-D x: ``quantize_tiles_reference``'s q and s, bit for bit. axis 1: a grid over row blocks, each
    (tm, Kp) whole; axis 0: over (r 128-row tiles, tk columns) blocks, a ragged last column block
    left to Pallas's edge masking (columns are independent)."""
    body = functools.partial(_tpu_rows_body if axis == 1 else _tpu_cols_body, pow2=pow2, amax_min=amax_min)
    x = pad_to(x, axis)
    m, k = x.shape
    if axis == 1:
        tm = min(512, max(32, TPU_BLOCK_ELEMS // k // 32 * 32))  # rows: e4m3 tiles are (32, 128)
        tm = m if m <= tm else tm
        grid, x_block, s_block = (pl.cdiv(m, tm),), (tm, k), (tm, k // TILE)
        index = lambda i: (i, 0)
        s_shape = (m, k // TILE)
    else:
        r = 8 if m // TILE >= 8 else m // TILE  # scale rows per block: 8 (f32 sublanes), or all of them
        x = pad_to(x, 0, r * TILE)
        tk = k if k <= 512 else 512
        grid, x_block, s_block = (x.shape[0] // (r * TILE), pl.cdiv(k, tk)), (r * TILE, tk), (r, tk)
        index = lambda i, j: (i, j)
        s_shape = (x.shape[0] // TILE, k)
    q, s = pl.pallas_call(
        body,
        out_shape=(jax.ShapeDtypeStruct(x.shape, E4M3), jax.ShapeDtypeStruct(s_shape, jnp.float32)),
        grid=grid,
        in_specs=[pl.BlockSpec(x_block, index)],
        out_specs=(pl.BlockSpec(x_block, index), pl.BlockSpec(s_block, index)),
        interpret=interpret,
    )(x)
    return (q, s) if axis == 1 else (q[:m], s[: m // TILE])


def quantize_blocks(w, pow2: bool = False):
    """Scale per 128x128 block of the last two dims: w [..., K, N] -> (q [..., Kp, Np],
    s [..., Kp/128, Np/128]). Leading dims (experts) are batch."""
    w = pad_to(pad_to(w.astype(jnp.float32), -2), -1)
    *lead, k, n = w.shape
    b = w.reshape(*lead, k // TILE, TILE, n // TILE, TILE)
    s = scale_from_amax(jnp.max(jnp.abs(b), axis=(-3, -1)), pow2)
    q = to_e4m3(b, s[..., :, None, :, None]).reshape(w.shape)
    return q, s


def dequantize_tiles(q, s, axis: int = -1):
    """q s with s repeated over its tiles (inverse of ``quantize_tiles``, padded shape)."""
    return q.astype(jnp.float32) * jnp.repeat(s, TILE, axis=axis)


def dequantize_blocks(q, s):
    """q s with s repeated over its 128x128 blocks (inverse of ``quantize_blocks``, padded shape)."""
    return q.astype(jnp.float32) * jnp.repeat(jnp.repeat(s, TILE, axis=-2), TILE, axis=-1)
