"""E4M3 quantization with fine-grained scales (V3 report §3.3.2, REFERENCE §7).

    s = max(amax, 1e-4) / 448,   q = e4m3(x / s),   x ~= q s        (amax over one tile or block)

Activations get one scale per 1x128 tile along the contracted dim (``quantize_tiles(x)``), the
wgrad operand per 128x1 tile (``quantize_tiles(x, axis=0)``), weights per 128x128 block
(``quantize_blocks``). A tiled dim is zero-padded to a multiple of 128 and the padded arrays are
returned (zeros quantize to exact zeros); callers slice the GEMM output back.
"""

import jax.numpy as jnp

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
    m, e = jnp.frexp(s)  # s = m 2^e, m in [0.5, 1): the next power of two is 2^e, or s itself
    return jnp.ldexp(jnp.ones_like(s), jnp.where(m == 0.5, e - 1, e))


def to_e4m3(x, s):
    """e4m3(x / s), clipped to +-448 (x / s can round a hair above amax / s)."""
    return jnp.clip(x / s, -E4M3_MAX, E4M3_MAX).astype(E4M3)


def pad_to(x, axis: int, multiple: int = TILE):
    pad = -x.shape[axis] % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def quantize_tiles(x, axis: int = -1, pow2: bool = False, amax_min: float = AMAX_MIN):
    """Scale per 128 consecutive elements along ``axis``: x [..., K, ...] -> (q e4m3 with K padded
    to Kp, s fp32 with K replaced by Kp / 128). 2-D x [M, K]: axis -1 = 1x128 tiles (q [M, Kp],
    s [M, Kp/128]); axis 0 = 128x1 tiles (q [Mp, K], s [Mp/128, K]). Gradients: ``GRAD_AMAX_MIN``."""
    x = jnp.moveaxis(pad_to(x.astype(jnp.float32), axis), axis, -1)
    t = x.reshape(*x.shape[:-1], -1, TILE)
    s = scale_from_amax(jnp.max(jnp.abs(t), axis=-1), pow2, amax_min)
    q = to_e4m3(t, s[..., None]).reshape(x.shape)
    return jnp.moveaxis(q, -1, axis), jnp.moveaxis(s, -1, axis)


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
