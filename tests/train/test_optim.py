"""dsjax.train.optim: V3's learning-rate shape, the weight-decay mask, bf16 Adam moments."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dsjax.config import TrainConfig, load_config
from dsjax.model import Transformer
from dsjax.train.optim import decay_mask, lr_schedule
from tests.train.runs import TINY


def test_lr_schedule_shape():
    t = TrainConfig(
        learning_rate=1.0, warmup_steps=10, constant_steps=5, decay_steps=20, min_lr=0.1, min_lr_steps=3, tail_lr=0.01
    )
    lr = lr_schedule(t)
    expect = {
        0: 0.0,
        5: 0.5,
        10: 1.0,
        14: 1.0,
        15: 1.0,
        25: 0.1 + 0.45 * (1 + math.cos(math.pi / 2)),
        35: 0.1,
        37: 0.1,
        38: 0.01,
        1000: 0.01,
    }
    for step, want in expect.items():
        assert float(lr(step)) == pytest.approx(want, abs=1e-6), step


def test_weight_decay_mask_excludes_norms():
    cfg = load_config(TINY).model
    params = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    mask = decay_mask(nn.meta.unbox(params))
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
    norms = [k for k in flat if "norm" in k]
    assert norms and not any(flat[k] for k in norms)  # every RMSNorm scale excluded
    for must in (
        "['embed_tokens']['embedding']",
        "['lm_head']['kernel']",
        "['moe_layers']['layers']['mlp']['w_gate']",
        "['moe_layers']['layers']['mlp']['gate']",
        "['moe_layers']['layers']['self_attn']['kv_b_proj']['kernel']",
    ):
        assert flat[next(k for k in flat if k.endswith(must))], must
    assert "selection_bias" not in str(list(flat))  # the bias is not a parameter at all


def test_bf16_adam_moments_follow_plain_adamw_with_bf16_storage():
    """``moment_dtype: bfloat16`` (V3 report §3.3.3): both moments stored in bf16, each step's new
    moments (and the update) computed in fp32 from the stored ones -- against AdamW written out in
    numpy (global-norm clip, bias correction, decoupled decay on the masked leaves) over 6 steps. The
    fp32 default stays fp32, and its trajectory is not the bf16 one."""
    t = TrainConfig(
        learning_rate=0.1,
        warmup_steps=0,
        decay_steps=4,
        min_lr=0.01,
        grad_clip=0.5,
        weight_decay=0.1,
        moment_dtype="bfloat16",
    )
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "norm": {"scale": jnp.ones(4)}}
    grads = [jax.tree.map(lambda x, k=k: jnp.sin(3.0 * x + k) * 10.0 ** -(k % 3), params) for k in range(6)]
    from dsjax.train.optim import make_optimizer

    def run(cfg):
        tx, p = make_optimizer(cfg), params
        state = tx.init(p)
        for g in grads:
            u, state = tx.update(g, state, p)
            p = optax.apply_updates(p, u)
        return p, state

    got, state = run(t)
    adam = state[1][0]
    assert {x.dtype for x in jax.tree.leaves((adam.mu, adam.nu))} == {jnp.dtype(jnp.bfloat16)}
    bf16 = lambda x: np.asarray(jnp.asarray(x, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32))  # noqa: E731
    lr = lr_schedule(t)
    p = {"w": np.asarray(params["w"]), "scale": np.asarray(params["norm"]["scale"])}
    mu = {k: np.zeros_like(v) for k, v in p.items()}
    nu = {k: np.zeros_like(v) for k, v in p.items()}
    for step, g in enumerate(grads, 1):
        g = {"w": np.asarray(g["w"]), "scale": np.asarray(g["norm"]["scale"])}
        norm = np.sqrt(sum((v.astype(np.float64) ** 2).sum() for v in g.values()))
        g = {k: v * min(1.0, t.grad_clip / norm) for k, v in g.items()}
        for k in p:
            m = t.beta1 * mu[k] + (1 - t.beta1) * g[k]
            v = t.beta2 * nu[k] + (1 - t.beta2) * g[k] ** 2
            u = (m / (1 - t.beta1**step)) / (np.sqrt(v / (1 - t.beta2**step)) + t.eps)
            u = u + (t.weight_decay * p[k] if k == "w" else 0.0)  # no decay on norm scales
            p[k] = p[k] - float(lr(step - 1)) * u
            mu[k], nu[k] = bf16(m), bf16(v)
    np.testing.assert_allclose(np.asarray(got["w"]), p["w"], rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(got["norm"]["scale"]), p["scale"], rtol=2e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(adam.nu["w"], np.float32), nu["w"])  # stored: the rounded fp32 moments

    fp32, fp32_state = run(dataclasses.replace(t, moment_dtype="float32"))
    assert {x.dtype for x in jax.tree.leaves((fp32_state[1][0].mu, fp32_state[1][0].nu))} == {jnp.dtype(jnp.float32)}
    old_config = make_optimizer(load_config(TINY).train).init(params)[1][0]  # a config without the key: as before
    assert {x.dtype for x in jax.tree.leaves((old_config.mu, old_config.nu))} == {jnp.dtype(jnp.float32)}
    assert np.abs(np.asarray(fp32["w"]) - p["w"]).max() > 1e-5  # bf16 storage is visible: the test can tell
