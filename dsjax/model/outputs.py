"""What every DeepSeek model returns, and the two sequence helpers both generations use."""

import flax.struct
import jax
import jax.numpy as jnp

from dsjax.model.moe import RouterStats


@flax.struct.dataclass
class ModelOutput:
    logits: jax.Array  # [B, S, V] fp32
    mtp_logits: jax.Array | None  # [D, B, S, V] fp32, or None without MTP
    router: RouterStats | None  # main-model MoE layers, leading axis = layer
    mtp_router: RouterStats | None  # MTP modules' MoE layers, leading axis = depth
    # DSA (cfg.index_topk > 0): the indexers' loss, sum over layers and MTP modules of each one's KL
    # averaged over the tokens (V3.2 §2.1.1); None without DSA
    indexer_loss: jax.Array | None = None


def segment_positions(segment_ids):
    """Position of each token within its segment (restarts at every change of segment id)."""
    idx = jnp.arange(segment_ids.shape[-1])
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[..., :1], bool), segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1
    )
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=segment_ids.ndim - 1)


def shift_left(tokens, k: int):
    """t_{i+k} at position i (zero-filled at the end; those positions carry no MTP target)."""
    return jnp.pad(tokens[:, k:], ((0, 0), (0, min(k, tokens.shape[1]))))
