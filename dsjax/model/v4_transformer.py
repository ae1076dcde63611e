"""The DeepSeek-V4 transformer (V4 report §2): embedding copied into hc_mult streams, the decoder
stack (``v4_block``), the streams collapsed (``HyperHead``), final norm, output head; and the MTP
modules. Same interface as V3's ``Transformer`` (``dsjax.model.transformer.build_model`` picks):

    out = model.apply(variables, tokens, segment_ids=None, positions=None)         # ModelOutput
    h, normed, cache, router = model.apply(variables, tokens, positions, cache, method="decode")
    h1, normed1, cache = model.apply(variables, 0, h, next_tokens, positions, cache, method="draft")

h is the streams [B, S, hc_mult, D] before the head's collapse. MTP module k (as the release's
``mtp.K.*``): h'_k = e_proj(enorm(Emb(t_{i+k}))) + h_proj(hnorm(h^{k-1})) per stream, one sliding-
window block with learned routing, then its own hc_head and norm before the shared output head.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsjax.config import ModelConfig
from dsjax.model.hybrid_attention import SLIDING, HybridCache
from dsjax.model.hyper_connection import HyperHead
from dsjax.model.layers import RMSNorm, embed_lookup, linear, token_embedding
from dsjax.model.outputs import ModelOutput, segment_positions, shift_left
from dsjax.model.v4_block import V4Block, V4Stack, layer_plan


class MTPModuleV4(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, h_prev, emb_next, tokens, positions, segment_ids, token_mask, cache=None):
        """Returns (h^k streams, the normed collapse for the head, RouterStats, cache)."""
        c, pdt = self.cfg, jnp.dtype(self.cfg.param_dtype)
        e = linear(c, c.hidden_size, ("embed", "mlp"), "e_proj")(
            RMSNorm(c.rms_norm_eps, "norm", pdt, name="enorm")(emb_next)
        )
        h = linear(c, c.hidden_size, ("embed", "mlp"), "h_proj")(
            RMSNorm(c.rms_norm_eps, "norm", pdt, name="hnorm")(h_prev)
        )
        x = e[..., None, :] + h
        x, (stats, cache, _) = V4Block(c, SLIDING, "moe", name="block")(
            x, tokens, positions, segment_ids, token_mask, cache
        )
        normed = RMSNorm(c.rms_norm_eps, "norm", pdt, name="norm")(HyperHead(c, name="hc_head")(x))
        return x, normed, stats, cache


class TransformerV4(nn.Module):
    cfg: ModelConfig

    def setup(self):
        c = self.cfg
        self.embed_tokens = token_embedding(c)
        if not c.tie_word_embeddings:
            self.lm_head = linear(c, c.vocab_size, ("embed", "vocab"), "lm_head", quantize=False)
        self.layers = V4Stack(c)
        self.hc_head = HyperHead(c)
        self.norm = RMSNorm(c.rms_norm_eps, "norm", jnp.dtype(c.param_dtype))
        self.mtp = [MTPModuleV4(c) for _ in range(c.num_nextn_predict_layers)]

    def _embed(self, tokens):
        return embed_lookup(self.embed_tokens, tokens, self.cfg.dtype)

    def logits(self, normed):
        head = self.embed_tokens.attend if self.cfg.tie_word_embeddings else self.lm_head
        return head(normed).astype(jnp.float32)

    def _trunk(self, tokens, positions, segment_ids, token_mask, cache=None, routes=None):
        x = jnp.broadcast_to(self._embed(tokens)[..., None, :], (*tokens.shape, self.cfg.hc_mult, self.cfg.hidden_size))
        return self.layers(x, tokens, positions, segment_ids, token_mask, cache, routes)

    def __call__(self, tokens, segment_ids=None, positions=None, routes=None, mtp: bool = True) -> ModelOutput:
        """As ``Transformer.__call__``; ``routes`` [L, B, S, K] replays the learned-routing layers."""
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        if positions is None:
            positions = segment_positions(segment_ids)
        token_mask = segment_ids > 0
        x, router, _, kl = self._trunk(tokens, positions, segment_ids, token_mask, routes=routes)
        logits = self.logits(self.norm(self.hc_head(x)))
        mtp_logits, mtp_stats = [], []
        for k, module in enumerate(self.mtp if mtp else (), 1):
            nxt = shift_left(tokens, k)
            x, normed, stats, _ = module(x, self._embed(nxt), nxt, positions, segment_ids, token_mask)
            mtp_logits.append(self.logits(normed))
            mtp_stats.append(stats)
        return ModelOutput(
            logits=logits,
            mtp_logits=jnp.stack(mtp_logits) if mtp_logits else None,
            router=router,
            mtp_router=jax.tree.map(lambda *a: jnp.stack(a), *mtp_stats) if mtp_stats else None,
            # the CSA indexers' KL, summed over layers, averaged over the real tokens
            indexer_loss=None if kl is None else (kl * token_mask).sum() / jnp.maximum(token_mask.sum(), 1),
        )

    def decode(self, tokens, positions, cache):
        """Tokens [B, S] at ``positions`` (consecutive per row; -1: padding) with a decode cache
        (``init_v4_cache``). Returns (streams, their normed collapse, cache, RouterStats)."""
        live = positions >= 0
        h, router, layers, _ = self._trunk(tokens, positions, live.astype(jnp.int32), live, cache)
        return h, self.norm(self.hc_head(h)), {**cache, **layers}, router

    def draft(self, depth: int, h_prev, tokens, positions, cache):
        name = f"mtp_{depth}"
        live = positions >= 0
        h, normed, _, layer_cache = self.mtp[depth](
            h_prev, self._embed(tokens), tokens, positions, live.astype(jnp.int32), live, cache[name]
        )
        return h, normed, {**cache, name: layer_cache}


def init_v4_cache(cfg: ModelConfig, batch: int, max_len: int, with_mtp: bool = False) -> dict:
    """An empty decode cache for ``max_len`` positions: per run of the stack (``layer_plan``) a tuple
    of ``HybridCache`` over the group's blocks (leading repeat axis when scanned), and per MTP module."""
    cache = {}
    for run in layer_plan(cfg):
        lead = (run.repeats,) if run.repeats > 1 else ()
        cache[run.name] = tuple(HybridCache.zeros(cfg, t, batch, max_len, lead) for t, _ in run.kinds)
    for d in range(cfg.num_nextn_predict_layers if with_mtp else 0):
        cache[f"mtp_{d}"] = HybridCache.zeros(cfg, SLIDING, batch, max_len)
    return cache


def cache_bytes_per_token(cfg: ModelConfig, context: int) -> float:
    """Decode-cache bytes per token of one sequence of ``context`` tokens (the main model's layers):
    the compressed entries grow with the context; the window and rings are a constant spread over it."""
    cache = jax.eval_shape(lambda: init_v4_cache(cfg, 1, context))
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache)) / context
