"""Manifold-constrained hyper-connections, mHC (DeepSeek-V4 report §2.2; Xie et al., 2026).

The residual stream is n = hc_mult parallel streams X [..., n, D]. Around every block (attention or
FFN), weights are projected from the streams themselves (one linear map of their RMS-normalised
concatenation, per-output scale alpha and bias b):

    pre  = sigmoid(alpha_pre  * X W_pre  + b_pre) + eps            [n]    collapses X into the block's input
    post = 2 sigmoid(alpha_post * X W_post + b_post)               [n]    spreads the block's output over X
    comb = SinkhornKnopp(softmax(alpha_comb * X W_comb + b_comb))  [n, n] mixes the streams (doubly stochastic)

    block input  u = sum_j pre_j X_j
    X'_k         = post_k f(u) + sum_j comb_jk X_j

Sinkhorn-Knopp alternates column and row normalisation (hc_sinkhorn_iters rounds in all, starting
with the columns), so comb is doubly stochastic and the residual mix cannot grow the streams' norm.
At the top, ``HyperHead`` collapses the streams with pre-style weights only. All of it runs in fp32
(HF transformers' ``DeepseekV4HyperConnection`` / ``DeepseekV4HyperHead``: the names of the hub's
``hc_attn_*`` / ``hc_ffn_*`` / ``hc_head_*`` tensors).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig


def sinkhorn(m, iters: int, eps: float):
    """Sinkhorn-Knopp: columns then rows normalised to sum 1, ``iters`` rounds (the first is columns only)."""
    m = m / (m.sum(-2, keepdims=True) + eps)

    def round_(_, m):
        m = m / (m.sum(-1, keepdims=True) + eps)
        return m / (m.sum(-2, keepdims=True) + eps)

    return jax.lax.fori_loop(0, iters - 1, round_, m)


def _flat_normed(x, eps: float):
    """The streams [..., n, D] as one RMS-normalised fp32 vector [..., n D] (no weight)."""
    flat = x.reshape(*x.shape[:-2], -1).astype(jnp.float32)
    return flat * jax.lax.rsqrt(jnp.mean(flat * flat, axis=-1, keepdims=True) + eps)


def _project(flat, fn):
    """flat [..., n D] . fn [out, n D]^T in full fp32 (a handful of outputs per token)."""
    return jnp.einsum("...i,oi->...o", flat, fn.astype(jnp.float32), precision="highest")


def collapse(x, pre):
    """sum_j pre_j X_j: [..., n, D] streams, [..., n] weights -> [..., D] in x's dtype."""
    return jnp.einsum("...n,...nd->...d", pre, x.astype(jnp.float32)).astype(x.dtype)


def expand(x, y, post, comb):
    """X'_k = post_k y + sum_j comb_jk X_j for streams x [..., n, D] and the block output y [..., D]."""
    dt = x.dtype
    mixed = jnp.einsum("...jk,...jd->...kd", comb.astype(dt), x)
    return post.astype(dt)[..., None] * y[..., None, :] + mixed


class HyperConnection(nn.Module):
    """One block's mHC weights from its input streams: (pre-collapsed input [..., D], post [..., n],
    comb [..., n, n])."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        c, n = self.cfg, self.cfg.hc_mult
        fn = self.param(
            "fn",
            nn.with_logical_partitioning(nn.initializers.normal(c.initializer_range), (None, "embed")),
            ((2 + n) * n, n * c.hidden_size),
            jnp.float32,
        )
        base = self.param("base", nn.with_logical_partitioning(nn.initializers.zeros, (None,)), ((2 + n) * n,))
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (None,)), (3,))
        mix = _project(_flat_normed(x, c.rms_norm_eps), fn)
        pre = jax.nn.sigmoid(mix[..., :n] * scale[0] + base[:n]) + c.hc_eps
        post = 2.0 * jax.nn.sigmoid(mix[..., n : 2 * n] * scale[1] + base[n : 2 * n])
        comb = mix[..., 2 * n :] * scale[2] + base[2 * n :]
        comb = jax.nn.softmax(comb.reshape(*mix.shape[:-1], n, n), axis=-1) + c.hc_eps
        return collapse(x, pre), post, sinkhorn(comb, c.hc_sinkhorn_iters, c.hc_eps)


class HyperHead(nn.Module):
    """The final collapse of the streams before the output norm: sum_j (sigmoid(alpha X W + b)_j + eps) X_j."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        c, n = self.cfg, self.cfg.hc_mult
        fn = self.param(
            "fn",
            nn.with_logical_partitioning(nn.initializers.normal(c.initializer_range), (None, "embed")),
            (n, n * c.hidden_size),
            jnp.float32,
        )
        base = self.param("base", nn.with_logical_partitioning(nn.initializers.zeros, (None,)), (n,))
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (None,)), (1,))
        pre = jax.nn.sigmoid(_project(_flat_normed(x, c.rms_norm_eps), fn) * scale + base) + c.hc_eps
        return collapse(x, pre)
