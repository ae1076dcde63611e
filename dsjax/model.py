"""The DeepSeek-V2/V3 transformer: embedding, first_k_dense_replace dense blocks, MoE blocks,
final norm, output head, and D MTP modules sharing embedding and head.

    model = Transformer(cfg)
    variables = model.init(rng, tokens)          # {"params": ..., "selection_bias": ...}
    out = model.apply(variables, tokens, segment_ids=None, positions=None)
    out.logits [B, S, V] fp32, out.mtp_logits [D, B, S, V] (position i of depth k predicts t_{i+k+1})
"""

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from dsjax.block import Stack
from dsjax.config import ModelConfig
from dsjax.linear import linear
from dsjax.moe import RouterStats
from dsjax.mtp import MTPModule
from dsjax.norm import RMSNorm
from dsjax.rope import rope_angles


@flax.struct.dataclass
class ModelOutput:
    logits: jax.Array  # [B, S, V] fp32
    mtp_logits: jax.Array | None  # [D, B, S, V] fp32, or None without MTP
    router: RouterStats | None  # main-model MoE layers, leading axis = layer
    mtp_router: RouterStats | None  # MTP modules' MoE layers, leading axis = depth


def segment_positions(segment_ids):
    """Position of each token within its segment (restarts at every change of segment id)."""
    idx = jnp.arange(segment_ids.shape[-1])
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[..., :1], bool), segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1
    )
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=segment_ids.ndim - 1)


def attention_mask(segment_ids):
    """[B, S, S] bool: causal, and only within the same segment (packed documents stay apart)."""
    s = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((s, s), bool))
    return causal & (segment_ids[:, :, None] == segment_ids[:, None, :])


def shift_left(tokens, k: int):
    """t_{i+k} at position i (zero-filled at the end; those positions carry no MTP target)."""
    return jnp.pad(tokens[:, k:], ((0, 0), (0, k)))


class Transformer(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens, segment_ids=None, positions=None) -> ModelOutput:
        """tokens [B, S] int; segment_ids [B, S] int (0 = padding; default one segment);
        positions [B, S] int (default: index within the segment)."""
        c = self.cfg
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        if positions is None:
            positions = segment_positions(segment_ids)
        mask, token_mask = attention_mask(segment_ids), segment_ids > 0
        cos, sin = rope_angles(c, positions)

        embed = nn.Embed(
            c.vocab_size, c.hidden_size, dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype),
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(c.initializer_range), ("vocab", "embed")),
            name="embed_tokens",
        )  # fmt: skip
        if c.tie_word_embeddings:
            head = embed.attend
        else:
            head = linear(c, c.vocab_size, ("embed", "vocab"), "lm_head")

        def logits_of(h):
            return head(h).astype(jnp.float32)

        x = embed(tokens)
        if c.first_k_dense_replace:
            x, _ = Stack(c, False, c.first_k_dense_replace, name="dense_layers")(x, cos, sin, mask, token_mask)
        router = None
        if c.num_moe_layers:
            x, router = Stack(c, True, c.num_moe_layers, name="moe_layers")(x, cos, sin, mask, token_mask)
        logits = logits_of(RMSNorm(c.rms_norm_eps, "embed", jnp.dtype(c.param_dtype), name="norm")(x))

        mtp_logits, mtp_stats = [], []
        for k in range(1, c.num_nextn_predict_layers + 1):
            x, normed, stats = MTPModule(c, name=f"mtp_{k - 1}")(x, embed(shift_left(tokens, k)), cos, sin, mask, token_mask)
            mtp_logits.append(logits_of(normed))
            mtp_stats.append(stats)
        return ModelOutput(
            logits=logits,
            mtp_logits=jnp.stack(mtp_logits) if mtp_logits else None,
            router=router,
            mtp_router=jax.tree.map(lambda *a: jnp.stack(a), *mtp_stats) if mtp_stats else None,
        )


def abstract_variables(cfg: ModelConfig):
    """Shapes and dtypes of every variable (no allocation), with logical-axis metadata boxes."""
    model = Transformer(cfg)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Total and per-token activated parameter counts, from the real module shapes."""
    params = nn.meta.unbox(abstract_variables(cfg)["params"])
    counts = {"main": 0, "mtp": 0, "activated": 0, "routed_experts": 0, "embedding_and_head": 0}
    active_frac = cfg.num_experts_per_tok / cfg.n_routed_experts
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        keys = [getattr(p, "key", str(p)) for p in path]
        n = int(leaf.size)
        is_mtp = keys[0].startswith("mtp_")
        routed = keys[-1] in ("w_gate", "w_up", "w_down")
        counts["mtp" if is_mtp else "main"] += n
        if keys[0] in ("embed_tokens", "lm_head"):
            counts["embedding_and_head"] += n
        if not is_mtp:
            counts["routed_experts"] += n if routed else 0
            counts["activated"] += round(n * active_frac) if routed else n
    counts["total"] = counts["main"] + counts["mtp"]
    return counts
