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


def _mix(module: nn.Module, x, outputs: int, scales: int):
    """The mixing weights' inputs: X W [..., outputs] from the RMS-normalised streams (no weight, fp32,
    full precision), and the parameters ``base`` [outputs] and ``scale`` [scales] (alpha) that go with
    ``fn`` = W [outputs, n D], as the hub's ``*_fn`` / ``*_base`` / ``*_scale``."""
    c = module.cfg
    fn = module.param(
        "fn",
        nn.with_logical_partitioning(nn.initializers.normal(c.initializer_range), (None, "embed")),
        (outputs, x.shape[-2] * x.shape[-1]),
        jnp.float32,
    )
    base = module.param("base", nn.with_logical_partitioning(nn.initializers.zeros, (None,)), (outputs,))
    scale = module.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (None,)), (scales,))
    flat = x.reshape(*x.shape[:-2], -1).astype(jnp.float32)
    flat = flat * jax.lax.rsqrt(jnp.mean(flat * flat, axis=-1, keepdims=True) + c.rms_norm_eps)
    return jnp.einsum("...i,oi->...o", flat, fn, precision="highest"), base, scale


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
        mix, base, scale = _mix(self, x, (2 + n) * n, 3)
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
        c = self.cfg
        mix, base, scale = _mix(self, x, c.hc_mult, 1)
        pre = jax.nn.sigmoid(mix * scale + base) + c.hc_eps
        return collapse(x, pre)
