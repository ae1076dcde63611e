"""DeepSeekMoE: shared experts + fine-grained routed experts (V3 report §2.1.2, REFERENCE §4).

    s = sigmoid(x W_gate) (V3) or softmax (V2);  choose top-k of s + b within the top groups
    y = sum_k w_k E_k(x) + shared(x),  w = s[top-k] (normalised if norm_topk_prob) * scaling

The per-expert selection bias b lives in the non-trainable ``selection_bias`` collection; it
changes which experts are picked, never their weights. Dispatch is dropless: the token copies are
sorted by expert and run through grouped matmuls (``dsjax.gmm``).
"""

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.gmm import grouped_matmul
from dsjax.mlp import MLP

BIAS = "selection_bias"  # variable collection of the aux-loss-free balancing bias


@flax.struct.dataclass
class RouterStats:
    """Per MoE layer (leading axis when stacked): what balancing needs."""

    expert_counts: jax.Array  # [..., E] int32: token copies routed to each expert (padding excluded)
    balance_loss: jax.Array  # [...] sequence-wise balance loss sum_i f_i P_i, mean over sequences


def route(scores, bias, cfg: ModelConfig):
    """Group-limited top-k on s + b; returns (expert ids [T, K], weights [T, K]) from unbiased s."""
    t, e = scores.shape
    sel = scores + bias
    if cfg.n_group > 1:
        groups = sel.reshape(t, cfg.n_group, e // cfg.n_group)
        if cfg.topk_method == "noaux_tc":  # V3: a group scores the sum of its top-2 experts
            group_score = jax.lax.top_k(groups, 2)[0].sum(-1)
        else:  # V2 group_limited_greedy: a group scores its best expert
            group_score = groups.max(-1)
        keep = jax.lax.top_k(group_score, cfg.topk_group)[1]
        group_mask = jnp.zeros((t, cfg.n_group), bool).at[jnp.arange(t)[:, None], keep].set(True)
        sel = jnp.where(jnp.repeat(group_mask, e // cfg.n_group, axis=1), sel, -jnp.inf)
    idx = jax.lax.top_k(sel, cfg.num_experts_per_tok)[1]
    w = jnp.take_along_axis(scores, idx, axis=-1)
    if cfg.norm_topk_prob:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return idx, w * cfg.routed_scaling_factor


def balance_loss(scores, idx, token_mask, num_experts: int):
    """Complementary sequence-wise loss, mean over non-empty sequences of sum_i f_i P_i (V3 eq. 17-20).

    scores [B, S, E], idx [B, S, K], token_mask [B, S]: f_i = E / (K T) * #tokens routed to i,
    P_i = mean_t s_i,t / sum_j s_j,t, both over the sequence's real tokens.
    """
    k = idx.shape[-1]
    m = token_mask.astype(jnp.float32)
    n_tok = jnp.maximum(m.sum(-1), 1.0)  # [B]
    counts = (jax.nn.one_hot(idx, num_experts, dtype=jnp.float32) * m[..., None, None]).sum((1, 2))
    f = counts * num_experts / (k * n_tok[:, None])
    p = ((scores / scores.sum(-1, keepdims=True)) * m[..., None]).sum(1) / n_tok[:, None]
    has_tokens = token_mask.any(-1)  # all-padding rows do not dilute the mean
    return jnp.sum(jnp.where(has_tokens, (f * p).sum(-1), 0.0)) / jnp.maximum(has_tokens.sum(), 1)


def experts_dropless(x, idx, w, w_gate, w_up, w_down, impl: str = "auto", fp8: str | None = None):
    """sum_k w_k SwiGLU_{idx_k}(x) for x [T, H], computing only the chosen (token, expert) pairs.

    ``fp8``: None for plain matmuls, else the FP8 GEMM implementation (``ModelConfig.fp8_impl``)."""
    t, k = idx.shape
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # token copies grouped by expert
    sizes = jnp.bincount(flat, length=w_gate.shape[0])
    xs = x[order // k]
    h = nn.silu(grouped_matmul(xs, w_gate, sizes, impl, fp8)) * grouped_matmul(xs, w_up, sizes, impl, fp8)
    ys = grouped_matmul(h, w_down, sizes, impl, fp8)
    ys = ys[jnp.argsort(order)].reshape(t, k, -1)  # back to (token, k) order: no scatter needed
    return jnp.einsum("tkh,tk->th", ys, w.astype(ys.dtype))


def experts_dense(x, idx, w, w_gate, w_up, w_down):
    """Reference: every expert on every token, combined with a dense [T, E] weight matrix."""
    gates = jnp.zeros((x.shape[0], w_gate.shape[0]), w.dtype).at[jnp.arange(x.shape[0])[:, None], idx].add(w)
    h = nn.silu(jnp.einsum("th,ehi->tei", x, w_gate)) * jnp.einsum("th,ehi->tei", x, w_up)
    return jnp.einsum("tei,eih,te->th", h, w_down, gates.astype(x.dtype))


class MoE(nn.Module):
    cfg: ModelConfig

    def _param(self, name, shape, axes):
        init = nn.with_logical_partitioning(nn.initializers.normal(self.cfg.initializer_range), axes)
        return self.param(name, init, shape, jnp.dtype(self.cfg.param_dtype))

    @nn.compact
    def __call__(self, x, token_mask):
        c = self.cfg
        b, s, hdim = x.shape
        e, i = c.n_routed_experts, c.moe_intermediate_size
        w_router = self._param("gate", (hdim, e), ("embed", "experts"))
        bias = self.variable(BIAS, "e_score_correction_bias", jnp.zeros, (e,), jnp.float32).value
        w_gate = self._param("w_gate", (e, hdim, i), ("experts", "embed", "expert_mlp")).astype(c.dtype)
        w_up = self._param("w_up", (e, hdim, i), ("experts", "embed", "expert_mlp")).astype(c.dtype)
        w_down = self._param("w_down", (e, i, hdim), ("experts", "expert_mlp", "embed")).astype(c.dtype)

        logits = jnp.dot(x.astype(jnp.float32), w_router.astype(jnp.float32), precision="highest")
        scores = jax.nn.sigmoid(logits) if c.scoring_func == "sigmoid" else jax.nn.softmax(logits, -1)
        idx, w = route(scores.reshape(b * s, e), bias, c)
        y = experts_dropless(x.reshape(b * s, hdim), idx, w, w_gate, w_up, w_down, c.moe_impl, c.fp8_impl if c.fp8 else None)
        y = y.reshape(b, s, hdim)
        if c.n_shared_experts:
            y = y + MLP(c, c.n_shared_experts * i, name="shared_experts")(x)

        idx = idx.reshape(b, s, -1)
        counts = jnp.bincount(jnp.where(token_mask[..., None], idx, e).reshape(-1), length=e + 1)[:e]
        stats = RouterStats(counts.astype(jnp.int32), balance_loss(scores, idx, token_mask, e))
        return y, stats
