"""DeepSeek Sparse Attention's lightning indexer (DeepSeek-V3.2 report §2.1, eq. 1) and its losses (§2.1.1).

    I_ts = sum_j w_tj ReLU(q_tj . k_s)          q_tj = W_qb c_q (per index head j), k_s = LayerNorm(W_k x_s),
                                                w_t = W_w x_t; RoPE on the first qk_rope_head_dim channels
    S_t  = the top-k s of I_t,: (among the keys query t may see)     MLA then attends to S_t only

The half-split RoPE layout and the scales (w times n_heads^-1/2 and head_dim^-1/2) follow HF
transformers' ``DeepseekV32Indexer`` and the official inference code. The official code also rotates
q and k by a Hadamard matrix and scores in FP8: the rotation is orthogonal (q.k unchanged), and FP8
is a precision choice, so like HF we score in the compute dtype (fp32 accumulation).

Training (§2.1.1), with p_t,: = the main attention's distribution, summed over heads, L1-normalised:
    dense warm-up:   L_I = sum_t KL(p_t,: || softmax(I_t,:))            over every key t may see
    sparse training: L_I = sum_t KL(p_t,S_t || softmax(I_t,S_t))        over the selected keys only
p is a fixed target (no gradient), and the indexer's inputs are detached from the main model's graph
(the caller's ``stop_gradient``), so L_I trains the indexer alone and the LM loss the rest.

Nothing here materialises [queries, keys] for the whole sequence: scores, top-k and the losses run
on blocks of queries (``attention.query_blocks``), each block's [b, block, index heads, keys].
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.model.attention import AttentionMask, gather_slots, query_blocks
from dsjax.model.layers import linear
from dsjax.model.rope import apply_rope_half

# Query-block budget of the jnp indexer: about this many fp32 [block, index heads, keys] scores at a time.
SCORE_BUDGET = 2**26


class Indexer(nn.Module):
    """The indexer's projections: wq_b (from the query LoRA latent), wk + k_norm (LayerNorm, from the
    hidden state), weights_proj (head weights); names as the hub's ``self_attn.indexer.*``."""

    cfg: ModelConfig

    def setup(self):
        c = self.cfg
        self.wq_b = linear(c, (c.index_n_heads, c.index_head_dim), ("q_lora", "heads", None), "wq_b")
        self.wk = linear(c, c.index_head_dim, ("embed", None), "wk")
        self.k_norm = nn.LayerNorm(
            epsilon=1e-6,
            dtype=jnp.dtype(c.dtype),
            param_dtype=jnp.dtype(c.param_dtype),
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
        )
        self.weights_proj = linear(c, c.index_n_heads, ("embed", "heads"), "weights_proj", quantize=False)

    def __call__(self, x, q_latent, cos, sin):
        """x [b,s,H], q_latent [b,s,q_lora] -> (q [b,s,n,d], k [b,s,d], w [b,s,n] fp32 with both scales)."""
        c = self.cfg
        rot = c.qk_rope_head_dim
        q = self.wq_b(q_latent)
        k = self.k_norm(self.wk(x))
        q = jnp.concatenate([apply_rope_half(q[..., :rot], cos, sin), q[..., rot:]], axis=-1)
        k = jnp.concatenate([apply_rope_half(k[..., :rot], cos, sin), k[..., rot:]], axis=-1)
        w = self.weights_proj(x).astype(jnp.float32) * (c.index_n_heads**-0.5 * c.index_head_dim**-0.5)
        return q, k, w


def index_scores(q, k, w):
    """I [b, s, t] = sum_j w[b,s,j] ReLU(q[b,s,j] . k[b,t]) in fp32 (V3.2 eq. 1)."""
    qk = jnp.einsum("bsjd,btd->bsjt", q, k, preferred_element_type=jnp.float32)
    return jnp.einsum("bsj,bsjt->bst", w, jax.nn.relu(qk))


def selected_scores(q, k, w, indices):
    """I at the selected keys: [b, s, kk] for indices [b, s, kk] into k's t axis (-1 = none)."""
    qk = jnp.einsum("bsjd,bskd->bsjk", q, gather_slots(k, indices), preferred_element_type=jnp.float32)
    return jnp.einsum("bsj,bsjk->bsk", w, jax.nn.relu(qk))


def _block_size(heads: int, num_keys: int, num_queries: int) -> int:
    """Queries per block so that [block, heads, keys] stays near SCORE_BUDGET values (at least 8, at
    most every query)."""
    return min(max(8, SCORE_BUDGET // (heads * max(num_keys, 1))), num_queries)


def select_top_k(cfg: ModelConfig, q, k, w, mask: AttentionMask, topk: int):
    """The top-``topk`` keys of each query by I among those ``mask`` lets it see, ascending, -1
    past the keys it may see: [b, s, topk] int32. q [b,s,n,d], k [b,t,d], w [b,s,n]."""
    t = k.shape[1]
    block = _block_size(cfg.index_n_heads, t, q.shape[1])

    def one_block(q, w, limit, segment, k):
        visible = mask.visible(limit, segment, t)
        scores = jnp.where(visible, index_scores(q, k, w), -jnp.inf)
        top, idx = jax.lax.top_k(scores, topk)
        idx = jnp.where(top > -jnp.inf, idx, t)  # not visible: sorts last, then -1
        idx = jnp.sort(idx, axis=-1)
        return jnp.where(idx < t, idx, -1).astype(jnp.int32)

    return query_blocks(one_block, block, (q, w, *mask.query_limits()), (k,))


def _kl(p, logits, valid):
    """KL(p || softmax(logits)) over the valid keys, per query: p [..., k] (sums to 1 there)."""
    log_q = jax.nn.log_softmax(jnp.where(valid, logits, -jnp.inf), axis=-1)
    terms = jnp.where(valid & (p > 0), p * (jnp.log(jnp.where(p > 0, p, 1.0)) - log_q), 0.0)
    return terms.sum(-1)


def _attention_distribution(q_lat, q_pe, c, pe, valid, scale):
    """p [b, s, k]: softmax over keys of (q_lat.c + q_pe.pe) * scale, per head, averaged over heads
    (= summed and L1-normalised). c [b,s,k,r] / pe [b,s,k,dr] per query, or [b,1,t,.] shared."""
    scores = jnp.einsum("bshr,bskr->bhsk", q_lat, c, preferred_element_type=jnp.float32)
    scores += jnp.einsum("bshd,bskd->bhsk", q_pe, pe, preferred_element_type=jnp.float32)
    scores = jnp.where(valid[:, None], scores * scale, -jnp.inf)
    return jax.nn.softmax(scores, axis=-1).mean(axis=1)


def dense_indexer_kl(cfg, q_lat, q_pe, c_kv, k_pe, scale, iq, ik, iw, mask: AttentionMask):
    """Dense warm-up: KL(p_t,: || softmax(I_t,:)) per query over every visible key, [b, s] fp32.
    The main attention in absorbed form (q_lat = q_nope W_UK [b,s,h,r], q_pe, c_kv [b,t,r], k_pe),
    the indexer's iq [b,s,n,d], ik [b,t,d], iw [b,s,n]; p carries no gradient."""
    t = c_kv.shape[1]
    block = _block_size(cfg.index_n_heads + q_lat.shape[2], t, q_lat.shape[1])

    def one_block(q_lat, q_pe, iq, iw, limit, segment, c_kv, k_pe, ik):
        visible = mask.visible(limit, segment, t)
        p = _attention_distribution(q_lat, q_pe, c_kv[:, None], k_pe[:, None], visible, scale)
        return _kl(jax.lax.stop_gradient(p), index_scores(iq, ik, iw), visible)

    return query_blocks(one_block, block, (q_lat, q_pe, iq, iw, *mask.query_limits()), (c_kv, k_pe, ik))


def sparse_indexer_kl(cfg, q_lat, q_pe, c_kv, k_pe, scale, iq, ik, iw, indices):
    """Sparse training: KL(p_t,S_t || softmax(I_t,S_t)) per query over its selected keys S_t =
    indices [b, s, k] (-1 = none), [b, s] fp32; shapes as ``dense_indexer_kl``."""
    block = _block_size(cfg.index_n_heads + q_lat.shape[2], indices.shape[-1], q_lat.shape[1])

    def one_block(q_lat, q_pe, iq, iw, idx, c_kv, k_pe, ik):
        valid = idx >= 0
        p = _attention_distribution(q_lat, q_pe, gather_slots(c_kv, idx), gather_slots(k_pe, idx), valid, scale)
        return _kl(jax.lax.stop_gradient(p), selected_scores(iq, ik, iw, idx), valid)

    return query_blocks(one_block, block, (q_lat, q_pe, iq, iw, indices), (c_kv, k_pe, ik))
