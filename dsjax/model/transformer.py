"""The DeepSeek-V2/V3 transformer: embedding, first_k_dense_replace dense blocks, MoE blocks,
final norm, output head, and D MTP modules sharing embedding and head.

    model = Transformer(cfg)
    variables = model.init(rng, tokens)          # {"params": ..., "selection_bias": ...}
    out = model.apply(variables, tokens, segment_ids=None, positions=None)
    out.logits [B, S, V] fp32, out.mtp_logits [D, B, S, V] (position i of depth k predicts t_{i+k+1})

Decoding (``dsjax.infer.generate``) uses the other methods with a latent cache from ``init_cache``:

    h, normed, cache, router = model.apply(variables, tokens, positions, cache, method="decode")
    logits = model.apply(variables, normed, method="logits")
    h1, normed1, cache = model.apply(variables, 0, h, next_tokens, positions, cache, method="draft")
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsjax.config import ModelConfig
from dsjax.model.attention import AttentionMask
from dsjax.model.block import Stack
from dsjax.model.layers import RMSNorm, embed_lookup, linear, token_embedding
from dsjax.model.mla import LatentCache, PagedLatentCache
from dsjax.model.moe import hash_table
from dsjax.model.mtp import MTPModule
from dsjax.model.outputs import ModelOutput, segment_positions, shift_left
from dsjax.model.rope import rope_angles
from dsjax.model.v4_transformer import TransformerV4, init_v4_cache
from dsjax.parallel.rules import constrain


def attention_mask(segment_ids) -> AttentionMask:
    """Causal, and only within the same segment (packed documents stay apart); ``.dense(S)`` is the
    [B, S, S] bool."""
    return AttentionMask.causal(segment_ids)


class Transformer(nn.Module):
    cfg: ModelConfig

    def setup(self):
        c = self.cfg
        self.embed_tokens = token_embedding(c)
        if not c.tie_word_embeddings:
            self.lm_head = linear(c, c.vocab_size, ("embed", "vocab"), "lm_head", quantize=False)  # V3: head stays bf16
        if c.first_k_dense_replace:
            self.dense_layers = Stack(c, False, c.first_k_dense_replace)
        if c.num_moe_layers:
            self.moe_layers = Stack(c, True, c.num_moe_layers)
        self.norm = RMSNorm(c.rms_norm_eps, "norm", jnp.dtype(c.param_dtype))
        self.mtp = [MTPModule(c) for _ in range(c.num_nextn_predict_layers)]  # mtp_0, mtp_1, ...

    def _embed(self, tokens):
        return embed_lookup(self.embed_tokens, tokens, self.cfg.dtype)

    def __call__(self, tokens, segment_ids=None, positions=None, routes=None, mtp: bool = True) -> ModelOutput:
        """tokens [B, S] int; segment_ids [B, S] int (0 = padding; default one segment);
        positions [B, S] int (default: index within the segment); routes [L_moe, B, S, K] int
        (-1: route freely): routing replay in the main model's MoE layers (``dsjax.model.moe.route``);
        ``mtp``: run the MTP modules (off: ``mtp_logits`` and ``mtp_router`` are None)."""
        c = self.cfg
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        if positions is None:
            positions = segment_positions(segment_ids)
        mask, token_mask = attention_mask(segment_ids), segment_ids > 0
        cos, sin = rope_angles(c, positions)

        x, router, _, index_kl = self._trunk(tokens, cos, sin, mask, token_mask, routes=routes)
        logits = self._split(self.logits(self._split(self.norm(x))))

        mtp_logits, mtp_stats = [], []
        for k, module in enumerate(self.mtp if mtp else (), 1):
            x, normed, stats, _, kl = module(x, self._embed(shift_left(tokens, k)), cos, sin, mask, token_mask)
            mtp_logits.append(self._split(self.logits(self._split(normed))))
            mtp_stats.append(stats)
            index_kl += [kl[None]] if kl is not None else []
        return ModelOutput(
            logits=logits,
            mtp_logits=jnp.stack(mtp_logits) if mtp_logits else None,
            router=router,
            mtp_router=jax.tree.map(lambda *a: jnp.stack(a), *mtp_stats) if mtp_stats else None,
            indexer_loss=_indexer_loss(index_kl, token_mask),
        )

    def _split(self, x):
        """[B, S, ...] split along the sequence too under sequence parallelism (the logits: 1/tensor each)."""
        return constrain(x, ("batch", "seq", None)) if self.cfg.sequence_parallel else x

    def _trunk(self, tokens, cos, sin, mask, token_mask, cache=None, positions=None, routes=None):
        """h^0 = the blocks applied to Emb(tokens), before the final norm. Returns (h^0, router, cache,
        the indexers' KL per token: a list of [L, B, S] arrays, empty without DSA)."""
        x, router, cache, index_kl = self._embed(tokens), None, dict(cache or {}), []
        if self.cfg.first_k_dense_replace:
            x, _, cache["dense_layers"], kl = self.dense_layers(
                x, cos, sin, mask, token_mask, cache.get("dense_layers"), positions
            )
            index_kl += [kl] if kl is not None else []
        if self.cfg.num_moe_layers:
            x, router, cache["moe_layers"], kl = self.moe_layers(
                x, cos, sin, mask, token_mask, cache.get("moe_layers"), positions, routes
            )
            index_kl += [kl] if kl is not None else []
        return x, router, cache, index_kl

    def logits(self, normed):
        """The output head shared by the model and its MTP modules: W_head h (Emb^T h if tied), fp32."""
        head = self.embed_tokens.attend if self.cfg.tie_word_embeddings else self.lm_head
        return head(normed).astype(jnp.float32)

    def decode(self, tokens, positions, cache):
        """The main model on tokens [B, S] at ``positions`` [B, S], with a decode cache (``init_cache``):
        their latents are written at their positions, then each attends to every slot <= its own
        position (absorbed MLA). Returns (h^0, RMSNorm(h^0) for ``logits``, cache, the main MoE
        layers' RouterStats or None)."""
        cos, sin, mask = _decode_inputs(self.cfg, positions)
        h, router, cache, _ = self._trunk(tokens, cos, sin, mask, jnp.ones(tokens.shape, bool), cache, positions)
        return h, self.norm(h), cache, router

    def draft(self, depth: int, h_prev, tokens, positions, cache):
        """MTP module k = depth + 1 at ``positions``: h'_i = W_eh [enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]
        with ``tokens`` = t_{i+k} and ``h_prev`` = h^{k-1}, then its block over its cache.
        Returns (h^k, shared_head_norm(h^k) for ``logits``, cache)."""
        cos, sin, mask = _decode_inputs(self.cfg, positions)
        name = f"mtp_{depth}"
        h, normed, _, kv, _ = self.mtp[depth](
            h_prev, self._embed(tokens), cos, sin, mask, jnp.ones(tokens.shape, bool), cache[name], positions
        )
        return h, normed, {**cache, name: kv}


def _indexer_loss(index_kl: list, token_mask):
    """Sum over layers of each layer's KL averaged over the real tokens; None without DSA."""
    if not index_kl:
        return None
    return (jnp.concatenate(index_kl) * token_mask).sum() / jnp.maximum(token_mask.sum(), 1)


def _decode_inputs(cfg: ModelConfig, positions):
    """RoPE angles of the positions, and the mask: cache slot j visible to position p iff j <= p."""
    cos, sin = rope_angles(cfg, positions)
    return cos, sin, AttentionMask.cache(positions)


def _cache_slots(cfg: ModelConfig, with_mtp: bool) -> dict[str, tuple[int, ...]]:
    """The decode cache's entries, named like the model's layer stacks (and MTP modules ``mtp_0`` ...),
    each with its leading layer axes."""
    slots = {}
    if cfg.first_k_dense_replace:
        slots["dense_layers"] = (cfg.first_k_dense_replace,)
    if cfg.num_moe_layers:
        slots["moe_layers"] = (cfg.num_moe_layers,)
    for d in range(cfg.num_nextn_predict_layers if with_mtp else 0):
        slots[f"mtp_{d}"] = ()
    return slots


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model a config describes: ``Transformer`` (V2, V3, V3.2) or ``TransformerV4``."""
    return TransformerV4(cfg) if cfg.is_v4 else Transformer(cfg)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, with_mtp: bool = False) -> dict:
    """An empty decode cache of ``max_len`` slots: a ``LatentCache`` per layer stack (leading layer
    axis, named like the stack) and, ``with_mtp``, one per MTP module (``mtp_0`` ...); V4: its
    per-layer-type ``HybridCache`` s (``init_v4_cache``)."""
    if cfg.is_v4:
        return init_v4_cache(cfg, batch, max_len, with_mtp)
    return {k: LatentCache.zeros(cfg, batch, max_len, layers) for k, layers in _cache_slots(cfg, with_mtp).items()}


def init_paged_cache(cfg: ModelConfig, num_pages: int, page_size: int, with_mtp: bool = False) -> dict:
    """An empty paged decode cache (``PagedLatentCache``), named like ``init_cache``'s: a pool of
    ``num_pages`` pages of ``page_size`` slots per layer (and, ``with_mtp``, per MTP module), all
    read through one page table per sequence (``with_pages``, set per call)."""
    slots = _cache_slots(cfg, with_mtp)
    return {k: PagedLatentCache.zeros(cfg, num_pages, page_size, layers) for k, layers in slots.items()}


def with_pages(cache: dict, page_table) -> dict:
    """The paged cache with every layer reading through ``page_table`` [B, n]."""
    return {
        k: c.replace(pages=jnp.broadcast_to(page_table, (*c.c_kv.shape[:-3], *page_table.shape)))
        for k, c in cache.items()
    }


def abstract_variables(cfg: ModelConfig):
    """Shapes and dtypes of every variable (no allocation), with logical-axis metadata boxes."""
    model = build_model(cfg)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))


def random_variables(cfg: ModelConfig, seed: int = 0):
    """Variables drawn like ``init`` (weights ~ N(0, initializer_range), norm scales 1, selection bias
    0, V4's hash table ``hash_table``'s, mHC biases 0) but in numpy: no init to trace and compile,
    for tests and benchmarks."""
    rng = np.random.default_rng(seed)

    def draw(path, a):
        if path[-1].key == "tid2eid":
            return np.broadcast_to(np.asarray(hash_table(cfg.vocab_size, cfg.n_routed_experts, a.shape[-1])), a.shape)
        if path[-1].key in ("base", "attn_sink", "ape"):
            return np.zeros(a.shape, a.dtype)
        if path[-1].key == "scale" or path[0].key == "selection_bias":
            return np.full(a.shape, float(path[-1].key == "scale"), a.dtype)
        return (cfg.initializer_range * rng.standard_normal(a.shape)).astype(a.dtype)

    return jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(abstract_variables(cfg)))


def echoing_variables(variables, alpha: float = 30.0):
    """Weights whose MTP drafts are predictably right, for tests and benchmarks of speculative decoding:
    the output head set to Emb^T, every residual branch scaled by alpha, and eh_proj passing the
    embedding through. At alpha 0 the model and its MTP modules both repeat their input token, so
    every draft is right; at alpha 30 (random weights otherwise) 70-90% are."""
    v = jax.tree.map(np.array, variables)
    p = v["params"]
    p["lm_head"]["kernel"] = p["embed_tokens"]["embedding"].T.copy()
    for path, leaf in jax.tree_util.tree_leaves_with_path(p):
        keys = [getattr(k, "key", "") for k in path]
        if keys[-2:] in (["o_proj", "kernel"], ["down_proj", "kernel"]) or keys[-1] == "w_down":
            leaf *= alpha
    for m in (k for k in p if k.startswith("mtp_")):
        h = p[m]["eh_proj"]["kernel"].shape[1]
        p[m]["eh_proj"]["kernel"] = np.concatenate([np.eye(h), np.zeros((h, h))]).astype(np.float32)
    return v
