"""The training objective (DeepSeek-V3 §2.2 eq. 25, §2.1.2 eq. 17-20):

    L = CE(t_{i+1}) + (lambda / D) sum_k CE_k(t_{i+k+1}) + alpha sum_layers sum_i f_i P_i

cross-entropies summed over positions whose target lies in the same (non-padding) document (and,
when the batch carries a ``loss_mask``, is marked in it: SFT trains on response tokens only),
divided by the count of such targets over the whole batch, so microbatch gradients add up.
"""

import jax.numpy as jnp
import optax

from dsjax.config import Config
from dsjax.model.moe import BIAS


def valid_targets(segment_ids, shift: int, loss_mask=None):
    """[B, S] bool: position i has a target t_{i+shift} in its own (non-padding) document, and one
    ``loss_mask`` [B, S] (if given) marks as a target."""
    shifted = lambda a: jnp.pad(a[:, shift:], ((0, 0), (0, shift)))  # noqa: E731
    valid = (segment_ids > 0) & (shifted(segment_ids) == segment_ids)
    return valid if loss_mask is None else valid & shifted(loss_mask).astype(bool)


def shifted_ce(logits, tokens, segment_ids, shift: int, loss_mask=None):
    """Sum of CE nats for predicting t_{i+shift} at i, over valid positions."""
    target = jnp.pad(tokens[:, shift:], ((0, 0), (0, shift)))
    nats = optax.softmax_cross_entropy_with_integer_labels(logits, target)
    return jnp.sum(jnp.where(valid_targets(segment_ids, shift, loss_mask), nats, 0.0))


def target_counts(batch, depth: int):
    """Valid targets of the main head and of each MTP depth: (scalar, [D])."""
    seg, mask = batch["segment_ids"], batch.get("loss_mask")
    mtp = [valid_targets(seg, k + 1, mask).sum() for k in range(1, depth + 1)]
    return valid_targets(seg, 1, mask).sum(), jnp.asarray(mtp, jnp.int32).reshape(depth)


def loss_sums(model, params, bias, batch, depth: int):
    """CE sums (main, per MTP depth), summed balance loss over MoE layers, and router loads."""
    out = model.apply({"params": params, BIAS: bias}, batch["tokens"], batch["segment_ids"], batch["positions"])
    tok, seg, mask = batch["tokens"], batch["segment_ids"], batch.get("loss_mask")
    mtp = [shifted_ce(out.mtp_logits[k - 1], tok, seg, k + 1, mask) for k in range(1, depth + 1)]
    routers = [r for r in (out.router, out.mtp_router) if r is not None]
    sums = {
        "ce": shifted_ce(out.logits, tok, seg, 1, mask),
        "mtp": jnp.asarray(mtp, jnp.float32).reshape(depth),
        "balance": sum((jnp.sum(r.balance_loss) for r in routers), jnp.zeros(())),
        "dropped": sum((jnp.mean(r.dropped) for r in routers), jnp.zeros(())) / max(len(routers), 1),
    }
    if out.indexer_loss is not None:
        sums["indexer"] = out.indexer_loss
    loads = {
        "main": out.router.expert_counts if out.router else None,
        "mtp": out.mtp_router.expert_counts if out.mtp_router else None,
    }
    return sums, loads


def total_loss(sums, counts, cfg: Config, num_micro: int):
    """CE + lambda/D sum_k CE_k + alpha * balance (balance averaged over microbatches), plus with DSA
    the indexers' KL (V3.2 §2.1.1; its gradient reaches only the indexers). In DSA's dense warm-up
    the loss is the indexers' KL alone: the main model is frozen."""
    ce = sums["ce"] / jnp.maximum(counts[0], 1)
    per_depth = sums["mtp"] / jnp.maximum(counts[1], 1)
    mtp = per_depth.mean() if per_depth.size else jnp.zeros(())
    balance = sums["balance"] / num_micro
    loss = ce + cfg.train.mtp_loss_weight * mtp + cfg.train.balance_loss_alpha * balance
    parts = {"ce": ce, "mtp": mtp, "balance": balance}
    if "indexer" in sums:
        parts["indexer"] = sums["indexer"] / num_micro
        loss = parts["indexer"] if cfg.model.indexer_warmup else loss + parts["indexer"]
    return loss, parts
