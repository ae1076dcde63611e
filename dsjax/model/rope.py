"""Rotary position embedding in DeepSeek's interleaved layout (DeepSeek-V2 §2.1.3), with YaRN (V2 §3.1.4).

Channel pairs (2i, 2i+1) rotate by angle pos * inv_freq_i, as in the official code's
``view_as_complex`` (``apply_rope``); V3.2's lightning indexer pairs channels (i, i + d/2) instead,
the half-split layout (``apply_rope_half``), with the same angles. YaRN blends interpolated and
extrapolated frequencies with a linear ramp over the pairs between the correction-range bounds.
"""

import math

import jax.numpy as jnp
import numpy as np

from dsjax.config import ModelConfig


def yarn_mscale(factor: float, mscale: float) -> float:
    """YaRN attention temperature: 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1; YaRN, arXiv 2309.00071)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    # Pair index whose wavelength fits num_rotations times into max_pos.
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def inv_frequencies(cfg: ModelConfig) -> np.ndarray:
    """inv_freq_i = theta^(-2i/d), YaRN-blended when rope_scaling is set. Shape [d/2], fp32."""
    d, theta = cfg.qk_rope_head_dim, cfg.rope_theta
    inv_freq = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    rs = cfg.rope_scaling
    if rs is not None:
        orig = rs.original_max_position_embeddings
        low = max(math.floor(_correction_dim(rs.beta_fast, d, theta, orig)), 0)
        high = min(math.ceil(_correction_dim(rs.beta_slow, d, theta, orig)), d - 1)
        ramp = np.clip((np.arange(d // 2) - low) / max(high - low, 1e-3), 0.0, 1.0)
        # inv_freq_i <- inv_freq_i * (1 - ramp_i) + (inv_freq_i / factor) * ramp_i
        inv_freq = inv_freq * (1 - ramp) + inv_freq / rs.factor * ramp
    return inv_freq.astype(np.float32)


def attention_factor(cfg: ModelConfig) -> float:
    """YaRN magnitude scaling of cos/sin: mscale(s, mscale) / mscale(s, mscale_all_dim).

    1.0 for every released DeepSeek config (mscale == mscale_all_dim); matches HF otherwise.
    """
    rs = cfg.rope_scaling
    if rs is None:
        return 1.0
    if rs.mscale and rs.mscale_all_dim:
        return yarn_mscale(rs.factor, rs.mscale) / yarn_mscale(rs.factor, rs.mscale_all_dim)
    return yarn_mscale(rs.factor, 1.0)


def softmax_scale(cfg: ModelConfig) -> float:
    """qk_head_dim^-0.5, times mscale(s, mscale_all_dim)^2 under YaRN (V3: x1.87385)."""
    scale = cfg.qk_head_dim**-0.5
    rs = cfg.rope_scaling
    if rs is not None and rs.mscale_all_dim:
        scale *= yarn_mscale(rs.factor, rs.mscale_all_dim) ** 2
    return scale


def rope_angles(cfg: ModelConfig, positions):
    """(cos, sin) of pos * inv_freq, each [..., d/2] fp32, already times the YaRN attention factor."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_frequencies(cfg))
    a = attention_factor(cfg)
    return jnp.cos(freqs) * a, jnp.sin(freqs) * a


def apply_rope(x, cos, sin):
    """Rotates interleaved pairs of x: queries [b, s, heads, d] or the shared key [b, s, d].

    cos/sin are [b, s, d/2] or [s, d/2] (``rope_angles`` of the positions).
    """
    if x.ndim == 4:  # per-head input: broadcast angles over the head axis
        cos, sin = cos[..., None, :], sin[..., None, :]
    x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x0, x1 = x32[..., 0], x32[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def apply_rope_half(x, cos, sin):
    """Rotates half-split pairs (i, i + d/2) of x [b, s, heads, d] or [b, s, d] (the DSA indexer's
    layout, V3.2; HF's ``rotate_half``): [x1 cos - x2 sin | x2 cos + x1 sin]."""
    if x.ndim == 4:
        cos, sin = cos[..., None, :], sin[..., None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
