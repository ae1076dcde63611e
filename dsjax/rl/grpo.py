"""GRPO's objective (DeepSeekMath arXiv 2402.03300 §4.1, eq. 3) and its update step.

    J = 1/G sum_i 1/|o_i| sum_t [ min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i) - beta KL_it ]
    rho_it = pi_theta(o_it | q, o_i,<t) / pi_old(o_it | q, o_i,<t)
    A_i = (r_i - mean(r)) / std(r)                  (outcome supervision, §4.1.2: the group is the baseline)
    KL_it = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1    (the k3 estimator, eq. 4: unbiased, >= 0)

The variants users of the field expect (``GRPOConfig``, TRL's names): ``loss_type`` "grpo" (the
paper: per sequence, then over sequences), "dapo" (over all completion tokens of the batch) or
"dr_grpo" (by a constant: sequences x max_completion_length); ``scale_rewards`` "none" (no std
division, Dr. GRPO); ``epsilon_high`` (DAPO's asymmetric clip); ``num_iterations`` (mu updates per
rollout batch against the kept old log-probs); ``drop_equal_reward_groups``. Every average is taken
as a sum of per-token weights fixed for the whole batch (``token_weights``), so microbatches and
mesh shards add up to the same loss.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.config import Config, GRPOConfig
from dsjax.model.moe import BIAS
from dsjax.train.loss import shifted_ce, target_counts
from dsjax.train.optim import make_optimizer
from dsjax.train.step import TrainState, accumulate_grads, apply_grads, split_microbatches, update_bias


def group_advantages(rewards, group_size: int, scale: str = "group") -> np.ndarray:
    """A_i = (r_i - mean of its group) / std (the group's, the batch's, or 1 for scale "none"); std
    with Bessel's correction plus 1e-4, as TRL computes it. rewards [N] with N = prompts x G, each
    prompt's G completions adjacent."""
    r = np.asarray(rewards, np.float64).reshape(-1, group_size)
    centred = r - r.mean(1, keepdims=True)
    if scale == "group":
        centred = centred / (r.std(1, ddof=1, keepdims=True) + 1e-4)
    elif scale == "batch":
        centred = centred / (r.std(ddof=1) + 1e-4)
    return centred.reshape(-1).astype(np.float32)


def equal_reward_groups(rewards, group_size: int) -> np.ndarray:
    """[N] bool: the completion's group has all rewards equal (its advantages are all 0)."""
    r = np.asarray(rewards).reshape(-1, group_size)
    return np.repeat((r == r[:, :1]).all(1), group_size)


def token_logps(logits, tokens, temperature: float = 1.0):
    """log pi(t_j | t_<j) and the entropy of pi(. | t_<j) at every position j >= 1 (0 at j = 0), from
    logits [N, T, V] at temperature T: the distribution the rollout sampled from. Returns [N, T] x 2."""
    scaled = logits[:, :-1].astype(jnp.float32) / temperature
    logz = jax.nn.logsumexp(scaled, axis=-1)
    picked = jnp.take_along_axis(scaled, tokens[:, 1:, None], axis=-1)[..., 0]
    entropy = logz - jnp.sum(jax.nn.softmax(scaled, axis=-1) * scaled, axis=-1)
    pad = lambda a: jnp.pad(a, ((0, 0), (1, 0)))  # noqa: E731
    return pad(picked - logz), pad(entropy)


def token_weights(mask, loss_type: str, max_completion_length: int):
    """w [N, T] with loss = sum_it w_it * l_it for the averaging ``loss_type`` over the completion
    tokens ``mask`` [N, T]: "grpo" 1 / (|o_i| N), "dapo" 1 / sum |o_i|, "dr_grpo" 1 / (N L). N counts
    the sequences with a token in the loss."""
    mask = mask.astype(jnp.float32)
    lengths = mask.sum(1, keepdims=True)
    n = jnp.maximum((lengths > 0).sum(), 1)
    if loss_type == "grpo":
        return mask / (jnp.maximum(lengths, 1) * n)
    if loss_type == "dapo":
        return mask / jnp.maximum(mask.sum(), 1)
    return mask / (n * max_completion_length)


def policy_terms(logp, old_logp, ref_logp, advantages, eps_low: float, eps_high: float, beta: float):
    """Per-token loss -(min(rho A, clip(rho) A) - beta KL), the k3 KL, and where the clip bit below
    (rho < 1 - eps_low with A < 0) or above (rho > 1 + eps_high with A > 0). logp etc. [N, T], A [N]."""
    ratio = jnp.exp(logp - old_logp)
    a = advantages[:, None]
    objective = jnp.minimum(ratio * a, jnp.clip(ratio, 1 - eps_low, 1 + eps_high) * a)
    kl = jnp.zeros_like(logp) if ref_logp is None else jnp.exp(ref_logp - logp) - (ref_logp - logp) - 1
    low = (ratio < 1 - eps_low) & (a < 0)
    high = (ratio > 1 + eps_high) & (a > 0)
    return -(objective - beta * kl), kl, low, high


def policy_forward(model, params, bias, batch, mtp: bool = False):
    """The model on the rollout sequences (``ModelOutput``; MTP modules only if ``mtp``); with
    ``batch["routes"]`` [N, L, T, K]: routing replay."""
    routes = batch.get("routes")
    return model.apply(
        {"params": params, BIAS: bias},
        batch["tokens"],
        batch["segment_ids"],
        None,
        None if routes is None else jnp.moveaxis(routes, 1, 0),
        mtp=mtp,
    )


def make_logps_fn(model, temperature: float):
    """(params, bias, batch) -> (token log-probs [N, T], expert ids [N, L, T, K] or None): the old
    policy's log-probs (num_iterations > 1), the reference's (beta > 0), and the experts this
    forward picks, for the routing mismatch against the rollout's."""

    def logps(params, bias, batch):
        out = policy_forward(model, params, bias, batch)
        ids = None if out.router is None else jnp.moveaxis(out.router.expert_ids, 0, 1)
        return token_logps(out.logits, batch["tokens"], temperature)[0], ids

    return logps


def routing_mismatch(rollout_routes, expert_ids, valid):
    """Fraction of (token, MoE layer) pairs whose set of experts differs between the rollout and the
    training forward, over the tokens the rollout ran (``valid`` [N, T]); routes [N, L, T, K]."""
    same = (jnp.sort(rollout_routes, -1) == jnp.sort(expert_ids, -1)).all(-1)  # [N, L, T]
    valid = (valid[:, None, :] & (rollout_routes[..., 0] >= 0)).astype(jnp.float32)
    return jnp.sum(jnp.where(same, 0.0, valid)) / jnp.maximum(valid.sum(), 1)


def reference_copy(params, dtype: str):
    """The frozen reference policy's weights (``beta`` > 0): a copy in the compute dtype
    (``model.dtype``), so a bf16 model keeps 2 bytes per parameter for it, not the 4 of its fp32
    masters. The matmuls read bf16 weights either way; the router and norms read them rounded."""
    floating = lambda p: jnp.issubdtype(p.dtype, jnp.floating)  # noqa: E731
    return jax.tree.map(lambda p: jnp.array(p, dtype if floating(p) else p.dtype, copy=True), params)  # never aliased


def frozen_mtp(params, old):
    """The update with every MTP module's weights put back (``grpo.train_mtp`` false)."""
    return {k: (old[k] if k.startswith("mtp_") else v) for k, v in params.items()}


def make_grpo_step(cfg: Config, model):
    """(state, batch) -> (state, metrics); jit it. batch: tokens, segment_ids [N, T] (the rollout
    sequences: prompt then completion, right-padded), completion_mask [N, T] (the sampled tokens in
    the loss), advantages [N], and as needed old_logp (num_iterations > 1), ref_logp (beta > 0) and
    routes [N, L, T, K] (routing replay). ``train_mtp``: the MTP modules also learn to predict the
    sampled completions (their cross-entropy, weighted by train.mtp_loss_weight), so that their
    drafts follow the changing policy; otherwise they keep their weights."""
    g: GRPOConfig = cfg.grpo
    depth = cfg.model.num_nextn_predict_layers if g.train_mtp else 0
    eps_high = g.epsilon if g.epsilon_high is None else g.epsilon_high
    tx = make_optimizer(rl_train_config(cfg))

    def step(state: TrainState, batch):
        weights = token_weights(batch["completion_mask"], g.loss_type, g.max_completion_length)
        mask = batch["completion_mask"].astype(jnp.float32)
        mtp_counts = target_counts({**batch, "loss_mask": batch["completion_mask"]}, depth)[1]

        def micro_loss(params, mb):
            out = policy_forward(model, params, state.bias, mb, mtp=depth > 0)
            router = out.router
            logp, entropy = token_logps(out.logits, mb["tokens"], g.temperature)
            old = mb["old_logp"] if "old_logp" in mb else jax.lax.stop_gradient(logp)
            per_token, kl, low, high = policy_terms(
                logp, old, mb.get("ref_logp"), mb["advantages"], g.epsilon, eps_high, g.beta
            )
            m = mb["completion_mask"].astype(jnp.float32)
            loss = jnp.sum(per_token * mb["weights"])
            for k in range(1, depth + 1):  # MTP depth k predicts t_{i+k+1}
                ce = shifted_ce(out.mtp_logits[k - 1], mb["tokens"], mb["segment_ids"], k + 1, mb["completion_mask"])
                loss += cfg.train.mtp_loss_weight / depth * ce / jnp.maximum(mtp_counts[k - 1], 1)
            sums = {
                "loss": loss,
                "kl": jnp.sum(kl * m),
                "entropy": jnp.sum(entropy * m),
                "clip_low": jnp.sum(low * m),
                "clip_high": jnp.sum(high * m),
                "loads": None if router is None else router.expert_counts,
            }
            return loss, sums

        micro = split_microbatches({**batch, "weights": weights}, g.microbatches)
        grads, sums = accumulate_grads(micro_loss, state.params, micro)
        bias = update_bias(state.bias, {"main": sums["loads"], "mtp": None}, cfg.train.bias_update_rate, cfg.model)
        new_state, ok, grad_norm = apply_grads(
            state,
            grads,
            sums["loss"],
            tx,
            bias if g.update_bias and sums["loads"] is not None else None,
            (lambda p, old: p) if g.train_mtp else frozen_mtp,
        )
        tokens = jnp.maximum(mask.sum(), 1)
        metrics = {
            "loss": sums["loss"],
            "kl": sums["kl"] / tokens,
            "entropy": sums["entropy"] / tokens,
            "clip_ratio/low_mean": sums["clip_low"] / tokens,
            "clip_ratio/high_mean": sums["clip_high"] / tokens,
            "clip_ratio/region_mean": (sums["clip_low"] + sums["clip_high"]) / tokens,
            "grad_norm": grad_norm,
            "ok": ok,
        }
        return new_state, metrics

    return step


def rl_train_config(cfg: Config):
    """The ``train`` section with GRPO's learning rate: warmup, then constant (DeepSeekMath §4.2)."""
    g = cfg.grpo
    return dataclasses.replace(
        cfg.train,
        learning_rate=g.learning_rate,
        warmup_steps=g.warmup_steps,
        constant_steps=10**9,
        decay_steps=0,
    )
