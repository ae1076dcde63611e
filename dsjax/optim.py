"""AdamW with the DeepSeek-V3 learning-rate shape (REFERENCE §8).

lr(t): linear warmup 0 -> peak, constant, cosine peak -> min_lr, min_lr for min_lr_steps, tail_lr.
Weight decay applies to every matrix (projections, experts, router, embedding, head), never to
norm scales; the selection bias is not a parameter at all (its own collection).
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
    return optax.chain(
        optax.clip_by_global_norm(t.grad_clip),
        optax.adamw(lr_schedule(t), b1=t.beta1, b2=t.beta2, eps=t.eps, weight_decay=t.weight_decay, mask=decay_mask),
    )
