"""The KV compressor of DeepSeek-V4's compressed attention (V4 report §2.3.1 CSA, §2.3.2 HCA).

Every window of m consecutive tokens (m = compress_rate_csa or compress_rate_hca; windows start at
position 0 of each document) becomes one entry. With C = H W^KV, Z = H W^Z + B (B = ``ape``, a bias
per offset in the window), per channel:

    HCA (eq. 20-23):  C^Comp_w = sum_{j in window w} softmax_j(Z_j) C_j
    CSA (eq. 9-12):   each token carries two series [C^a | C^b]; entry w pools window w's C^b and
                      window w-1's C^a together, softmax over those 2m slots (width 2m, stride m;
                      window -1 is empty: weight 0)

then RMSNorm and RoPE at the window's first position. An entry exists once its window is complete
(the token at position w m + m - 1 has arrived), and only queries at or after that position see it.

One function serves training and decoding: ``compress`` pools the tokens at given indices of the
projected tokens (a training sequence, packed documents and all; or a decode cache's ring of recent
tokens followed by the new ones), one entry per window.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.model.layers import RMSNorm, linear


def window_ends(positions, live, rate: int, count: int):
    """Indices [b, count] of the ``live`` tokens that close a window (position = -1 mod rate), in
    order; -1 pads. ``count`` bounds how many there can be."""

    def one(pos, ok):
        return jnp.nonzero(ok & ((pos + 1) % rate == 0), size=count, fill_value=-1)[0]

    return jax.vmap(one)(positions, live)


def windows_before(ends, rate: int):
    """For a contiguous sequence: the indices [b, n, rate] of each window's tokens (closing at
    ``ends``), and those of the window before it."""
    cur = jnp.maximum(ends, 0)[..., None] - jnp.arange(rate - 1, -1, -1)
    return cur, jnp.maximum(cur - rate, 0)


def compress(kv, gate, ape, window, previous, has_previous, overlap: bool):
    """Pooled entries [b, n, d] (before norm and RoPE) from kv, gate [b, L, c d] (c = 2 with
    ``overlap``: CSA's two series; 1: HCA) and ``ape`` [rate, c d]: entry j pools the tokens at
    indices ``window`` [b, n, rate] (HCA, or CSA's C^b) and, CSA, those at ``previous`` (C^a, where
    ``has_previous`` [b, n]; else weight 0)."""
    gather = jax.vmap(lambda a, i: a[i])
    cur_kv, cur_gate = gather(kv, window), gather(gate, window).astype(jnp.float32) + ape
    if overlap:
        d = kv.shape[-1] // 2
        prev_kv, prev_gate = gather(kv, previous)[..., :d], gather(gate, previous)[..., :d].astype(jnp.float32)
        prev_gate = jnp.where(has_previous[..., None, None], prev_gate + ape[:, :d], -jnp.inf)
        slots_kv = jnp.concatenate([prev_kv, cur_kv[..., d:]], axis=2)  # [b, n, 2 rate, d]
        slots_gate = jnp.concatenate([prev_gate, cur_gate[..., d:]], axis=2)
    else:
        slots_kv, slots_gate = cur_kv, cur_gate
    weights = jax.nn.softmax(slots_gate, axis=2)  # per channel, over the slots
    return jnp.einsum("bnjd,bnjd->bnd", weights.astype(kv.dtype), slots_kv)


class Compressor(nn.Module):
    """wkv, wgate, ape, norm: one compressed series (the attention's, head_dim wide; or the CSA
    indexer's, index_head_dim wide) at ``rate``, two overlapping series when ``overlap`` (CSA)."""

    cfg: ModelConfig
    dim: int
    rate: int
    overlap: bool

    def setup(self):
        c, width = self.cfg, self.dim * (2 if self.overlap else 1)
        # bf16 in the release (no FP8 scales): never quantized
        self.wkv = linear(c, width, ("embed", None), "wkv", quantize=False)
        self.wgate = linear(c, width, ("embed", None), "wgate", quantize=False)
        self.ape = self.param(
            "ape", nn.with_logical_partitioning(nn.initializers.zeros, (None, None)), (self.rate, width)
        )
        self.norm = RMSNorm(c.rms_norm_eps, "norm", jnp.dtype(c.param_dtype))

    def project(self, x):
        """(kv, gate) of tokens x [b, L, H]: what a decode cache keeps of its last 2 rate tokens."""
        return self.wkv(x), self.wgate(x)

    def __call__(self, kv, gate, window, previous, has_previous):
        """RMSNorm'd entries [b, n, dim] (``compress``'s arguments; RoPE is the caller's)."""
        return self.norm(compress(kv, gate, self.ape, window, previous, has_previous, self.overlap))
