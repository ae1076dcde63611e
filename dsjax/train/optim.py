"""AdamW with the DeepSeek-V3 learning-rate shape (DeepSeek-V3 §4.2).

lr(t): linear warmup 0 -> peak, constant, cosine peak -> min_lr, min_lr for min_lr_steps, tail_lr.
Weight decay applies to every matrix (projections, experts, router, embedding, head), never to
norm scales; the selection bias is not a parameter at all (its own collection).
``moment_dtype: bfloat16`` keeps both Adam moments in bf16, as V3 does (report §3.3.3): each step
updates them in fp32 from the stored values, takes the update from those, and stores them rounded.
"""

import jax
import jax.numpy as jnp
import optax

from dsjax.config import TrainConfig


def lr_schedule(t: TrainConfig):
    """step -> learning rate, a jnp function usable inside jit."""
    w, c, d, m = t.warmup_steps, t.constant_steps, t.decay_steps, t.min_lr_steps

    def lr(step):
        step = jnp.asarray(step, jnp.float32)
        warm = t.learning_rate * step / max(w, 1)
        frac = jnp.clip((step - w - c) / max(d, 1), 0.0, 1.0)
        cosine = t.min_lr + 0.5 * (t.learning_rate - t.min_lr) * (1 + jnp.cos(jnp.pi * frac))
        return jnp.select(
            [step < w, step < w + c, step < w + c + d, step < w + c + d + m],
            [warm, t.learning_rate, cosine, t.min_lr],
            t.tail_lr,
        )

    return lr


def decay_mask(params):
    """True where weight decay applies: everything but norm scales and biases."""

    def decays(path, _):
        name = getattr(path[-1], "key", "")
        return name not in ("scale", "bias")

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(t: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decoupled weight decay on the masked leaves)."""
    adamw = optax.adamw(lr_schedule(t), b1=t.beta1, b2=t.beta2, eps=t.eps, weight_decay=t.weight_decay, mask=decay_mask)
    if t.moment_dtype != "float32":
        adamw = _moments_in(adamw, jnp.dtype(t.moment_dtype))
    return optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw)


def _moments_in(tx: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
    """``tx`` with Adam's moments stored in ``dtype``: each update upcasts them to fp32, runs ``tx``
    there and rounds the new moments back. (optax's ``mu_dtype`` covers only the first moment, and
    scales the stored one by beta1 in its own low precision.)"""
    is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)  # noqa: E731

    def cast(state, to):
        moments = lambda s: s._replace(mu=optax.tree.cast(s.mu, to), nu=optax.tree.cast(s.nu, to))  # noqa: E731
        return jax.tree.map(lambda s: moments(s) if is_adam(s) else s, state, is_leaf=is_adam)

    def update(updates, state, params=None):
        updates, state = tx.update(updates, cast(state, jnp.float32), params)
        return updates, cast(state, dtype)

    return optax.GradientTransformation(lambda params: cast(tx.init(params), dtype), update)
