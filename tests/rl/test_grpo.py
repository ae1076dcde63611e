"""GRPO's equations against numpy restatements of DeepSeekMath §4.1 (eq. 3, 4), written here from
the paper, not from the code: advantages, the clipped objective and its gradient, the k3 KL, the
averaging modes; then the update step on a mesh, routing record and replay, SFT's loss mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.config import ConfigError, GRPOConfig, MeshConfig, TaskConfig
from dsjax.model import Transformer
from dsjax.model.transformer import random_variables
from dsjax.parallel.mesh import make_mesh
from dsjax.parallel.rules import batch_sharding
from dsjax.rl.grpo import (
    equal_reward_groups,
    group_advantages,
    make_grpo_step,
    make_logps_fn,
    policy_terms,
    rl_train_config,
    routing_mismatch,
    token_logps,
    token_weights,
)
from dsjax.rl.rollout import sample_completions
from dsjax.train.data import ByteTokenizer
from dsjax.train.loss import valid_targets
from dsjax.train.step import init_state, state_shardings
from tests.train.runs import small_cfg

# ---------------------------------------------------------------------------------------------
# The equations.


def test_group_advantages_are_the_papers_normalised_rewards():
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.2, 0.9])  # two groups of 4
    out = group_advantages(rewards, 4, "group")
    for g in range(2):
        r = rewards[4 * g : 4 * g + 4]
        mean = sum(r) / 4
        std = (sum((x - mean) ** 2 for x in r) / 3) ** 0.5  # sample std, as TRL
        np.testing.assert_allclose(out[4 * g : 4 * g + 4], [(x - mean) / (std + 1e-4) for x in r], rtol=1e-6)
    np.testing.assert_allclose(group_advantages(rewards, 4, "none")[:4], [0.5, -0.5, -0.5, 0.5], rtol=1e-6)
    batch_std = np.std(rewards, ddof=1)
    np.testing.assert_allclose(
        group_advantages(rewards, 4, "batch")[4:], (rewards[4:] - rewards[4:].mean()) / (batch_std + 1e-4), rtol=1e-6
    )
    assert equal_reward_groups([1, 1, 0, 1, 2, 2, 2, 2], 4).tolist() == [False] * 4 + [True] * 4


def numpy_terms(logp, old, ref, a, eps_low, eps_high, beta):
    """The per-token loss of eq. 3 (negated: minimised) and its derivative in logp, case by case."""
    rho = np.exp(logp - old)
    clipped = np.clip(rho, 1 - eps_low, 1 + eps_high)
    objective = np.minimum(rho * a, clipped * a)
    kl = np.exp(ref - logp) - (ref - logp) - 1  # pi_ref/pi - log(pi_ref/pi) - 1
    loss = -(objective - beta * kl)
    # d/dlogp: rho * a (rho = e^(logp - old)) inside the clip range, or outside it where the unclipped
    # term is the smaller; where the clipped term is, it is a constant.
    inside = (rho >= 1 - eps_low) & (rho <= 1 + eps_high)
    dobj = np.where(inside | (rho * a < clipped * a), rho * a, 0.0)
    dkl = 1 - np.exp(ref - logp)
    return loss, kl, -(dobj - beta * dkl)


@pytest.mark.parametrize("advantage", [1.5, -0.7])
def test_clipped_objective_and_gradient_inside_and_outside_the_clip_range(advantage):
    old = np.log(np.array([[0.5, 0.5, 0.5, 0.5, 0.5]]))
    # ratios 0.5, 0.9, 1.0, 1.1, 1.6: below, inside (x3) and above [1 - 0.2, 1 + 0.28]
    logp = old + np.log(np.array([[0.5, 0.9, 1.0, 1.1, 1.6]]))
    ref = np.log(np.array([[0.4, 0.6, 0.5, 0.3, 0.7]]))
    a = np.array([advantage])
    want_loss, want_kl, want_grad = numpy_terms(logp, old, ref, a, 0.2, 0.28, 0.04)

    def total(lp):
        return policy_terms(lp, jnp.asarray(old), jnp.asarray(ref), jnp.asarray(a), 0.2, 0.28, 0.04)[0].sum()

    loss, kl, low, high = policy_terms(jnp.asarray(logp), old, ref, jnp.asarray(a), 0.2, 0.28, 0.04)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(kl, want_kl, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(jax.grad(total)(jnp.asarray(logp)), want_grad, rtol=1e-5, atol=1e-7)
    # the clip bites below for negative advantages, above for positive ones
    assert low.tolist() == [[advantage < 0, False, False, False, False]]
    assert high.tolist() == [[False, False, False, False, advantage > 0]]


def test_k3_is_nonnegative_and_zero_for_equal_policies():
    rng = np.random.default_rng(0)
    logp, ref = np.log(rng.uniform(1e-3, 1, (2, 1000))), np.log(rng.uniform(1e-3, 1, (2, 1000)))
    zeros = np.zeros(2)
    kl = np.asarray(policy_terms(jnp.asarray(logp), logp, jnp.asarray(ref), zeros, 0.2, 0.2, 1.0)[1])
    assert kl.min() >= 0 and kl.max() > 0.1
    same = policy_terms(jnp.asarray(logp), logp, jnp.asarray(logp), zeros, 0.2, 0.2, 1.0)[1]
    assert float(jnp.abs(same).max()) == 0.0


def test_averaging_modes():
    rng = np.random.default_rng(1)
    per_token = rng.normal(size=(3, 6))
    mask = np.array([[0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1], [0, 1, 0, 0, 0, 0]])

    def loss(kind):
        return float(jnp.sum(token_weights(jnp.asarray(mask), kind, 10) * per_token))

    seq = [sum(per_token[i, t] for t in range(6) if mask[i, t]) / mask[i].sum() for i in range(3)]
    assert loss("grpo") == pytest.approx(sum(seq) / 3, rel=1e-6)  # 1/G sum_i 1/|o_i| sum_t
    assert loss("dapo") == pytest.approx((per_token * mask).sum() / mask.sum(), rel=1e-6)  # over all tokens
    assert loss("dr_grpo") == pytest.approx((per_token * mask).sum() / (3 * 10), rel=1e-6)  # a constant


def test_token_logps_are_log_softmax_at_the_next_token():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 5, 7))
    tokens = rng.integers(0, 7, (2, 5))
    logp, ent = token_logps(jnp.asarray(logits), jnp.asarray(tokens), temperature=0.7)
    z = logits / 0.7
    logsm = z - np.log(np.exp(z).sum(-1, keepdims=True))
    np.testing.assert_allclose(
        logp[:, 1:], np.take_along_axis(logsm[:, :-1], tokens[:, 1:, None], -1)[..., 0], rtol=1e-5
    )
    np.testing.assert_allclose(ent[:, 1:], -(np.exp(logsm) * logsm).sum(-1)[:, :-1], rtol=1e-5)
    assert float(jnp.abs(logp[:, 0]).max()) == 0.0


def test_routing_mismatch_counts_token_layer_pairs():
    rollout = np.array([[[[0, 1], [2, 3], [-1, -1]]]])  # [N=1, L=1, T=3, K=2]
    same_set = np.array([[[[1, 0], [2, 3], [5, 6]]]])  # order differs, unrecorded position ignored
    assert float(routing_mismatch(rollout, same_set, np.ones((1, 3), bool))) == 0.0
    other = np.array([[[[1, 0], [2, 4], [5, 6]]]])
    assert float(routing_mismatch(rollout, other, np.ones((1, 3), bool))) == 0.5


def test_sft_loss_mask_keeps_only_response_targets():
    seg = jnp.asarray([[1, 1, 1, 1, 2, 2, 2, 0]])
    response = jnp.asarray([[0, 0, 1, 1, 0, 1, 1, 0]])
    # position i trains on t_{i+1}: targets 2, 3 (segment 1) and 5, 6 (segment 2)
    assert valid_targets(seg, 1, response)[0].tolist() == [False, True, True, False, True, True, False, False]


# ---------------------------------------------------------------------------------------------
# The update step and rollouts on the tiny model.


def grpo_cfg(tmp_path, **grpo):
    cfg = small_cfg(tmp_path, "train.seq_len=48")
    grpo = {"learning_rate": 1e-3, **grpo}
    g = GRPOConfig(prompts_per_step=4, num_generations=2, max_completion_length=16, **grpo)
    return cfg.__class__(**{**cfg.__dict__, "task": TaskConfig(), "grpo": g})


def synthetic_batch(cfg, n=8, t=48, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 259, (n, t)).astype(np.int32)
    seg = np.ones((n, t), np.int32)
    seg[:, t - 5 :] = 0
    mask = np.zeros((n, t), np.int32)
    mask[:, 10 : t - 5 - (np.arange(n) % 4)[0]] = 1
    mask[1, 30:] = 0
    return {
        "tokens": tokens,
        "segment_ids": seg,
        "completion_mask": mask,
        "advantages": rng.normal(size=n).astype(np.float32),
        "old_logp": (rng.normal(size=(n, t)) * 0.1 - 5.5).astype(np.float32),
        "ref_logp": (rng.normal(size=(n, t)) * 0.1 - 5.5).astype(np.float32),
    }


def max_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.slow
def test_one_grpo_step_on_an_8_device_mesh_equals_one_device(tmp_path):
    # Adam's first step is about lr * sign(g): a small lr keeps float noise in near-zero gradients
    # from deciding the comparison.
    cfg = grpo_cfg(tmp_path, num_iterations=2, microbatches=2, learning_rate=1e-4)
    rcfg = cfg.__class__(**{**cfg.__dict__, "train": rl_train_config(cfg)})
    model = Transformer(cfg.model)
    state = init_state(rcfg, model, jax.random.key(0))
    batch = synthetic_batch(cfg)
    step = make_grpo_step(rcfg, model)
    one, m1 = jax.jit(step)(state, batch)
    mesh = make_mesh(MeshConfig(2, 2, 2, 1))  # data x fsdp x expert
    sh, bsh = state_shardings(rcfg, model, mesh), batch_sharding(mesh)
    with jax.set_mesh(mesh):
        many, m8 = jax.jit(step, in_shardings=(sh, bsh))(jax.device_put(state, sh), jax.device_put(batch, bsh))
    assert float(m1["grad_norm"]) > 0 and bool(m1["ok"])
    for k in ("loss", "kl", "entropy", "grad_norm"):
        assert abs(float(m8[k]) - float(m1[k])) <= 1e-5 * max(1.0, abs(float(m1[k]))), k
    assert max_diff(many.params, one.params) <= 1e-5
    assert max_diff(state.params, one.params) > 1e-4  # the step moved the weights
    # the MTP module stays frozen and the selection bias too (the RL defaults)
    assert max_diff(state.params["mtp_0"], one.params["mtp_0"]) == 0
    assert max_diff(state.bias, one.bias) == 0


def test_fp32_rollouts_route_like_the_training_forward_and_replay_changes_nothing(tmp_path):
    cfg = grpo_cfg(tmp_path)
    variables = random_variables(cfg.model, seed=3)
    ro = sample_completions(
        cfg.model, variables, ByteTokenizer(), ["12+7=", "3+4+5="], 2, 12,
        temperature=1.0, rng=jax.random.key(1), record_routes=True,
    )  # fmt: skip
    assert ro.routes.shape[:2] == (4, cfg.model.num_moe_layers) and (ro.routes >= 0).any()
    batch = {"tokens": ro.tokens, "segment_ids": ro.segment_ids}
    logps = jax.jit(make_logps_fn(Transformer(cfg.model), 1.0))
    logp, ids = logps(variables["params"], variables["selection_bias"], batch)
    assert float(routing_mismatch(ro.routes, ids, ro.segment_ids > 0)) == 0.0
    replayed, _ = logps(variables["params"], variables["selection_bias"], {**batch, "routes": ro.routes})
    assert float(jnp.max(jnp.abs(replayed - logp))) == 0.0
    # replaying other experts does change the forward: the test above could fail
    shifted = np.where(ro.routes >= 0, (ro.routes + 1) % cfg.model.n_routed_experts, -1)
    other, _ = logps(variables["params"], variables["selection_bias"], {**batch, "routes": shifted})
    assert float(jnp.max(jnp.abs(other - logp))) > 1e-4


def test_paged_rollouts_equal_generated_ones_and_route_like_the_training_forward(tmp_path):
    """grpo.rollout_engine=paged: greedy completions and their recorded experts equal generate's
    (two prompts x 3 completions forked from one prefill); sampled ones route like the training
    forward (mismatch 0) and end at EOS or the length limit."""
    cfg = grpo_cfg(tmp_path)
    variables = random_variables(cfg.model, seed=3)
    args = (cfg.model, variables, ByteTokenizer(), ["12+7=", "3+4+5=1"], 3, 12)
    plain = sample_completions(*args, temperature=0.0, record_routes=True)
    paged = sample_completions(*args, temperature=0.0, record_routes=True, paged=True)
    np.testing.assert_array_equal(paged.tokens, plain.tokens)
    np.testing.assert_array_equal(paged.completion_lengths, plain.completion_lengths)
    np.testing.assert_array_equal(paged.routes, plain.routes)
    assert paged.completions == plain.completions and (paged.truncated == plain.truncated).all()
    ro = sample_completions(*args, temperature=1.0, rng=jax.random.key(2), record_routes=True, paged=True)
    assert len({tuple(t) for t in ro.tokens}) > 2  # sampled: the forks differ
    batch = {"tokens": ro.tokens, "segment_ids": ro.segment_ids}
    _, ids = jax.jit(make_logps_fn(Transformer(cfg.model), 1.0))(
        variables["params"], variables["selection_bias"], batch
    )
    assert float(routing_mismatch(ro.routes, ids, ro.segment_ids > 0)) == 0.0


def test_paged_rollouts_refuse_mtp_drafting():
    with pytest.raises(ConfigError, match="rollout_engine=paged does not draft"):
        GRPOConfig(rollout_engine="paged", speculative=True)


def test_train_mtp_fits_the_mtp_modules_to_the_completions(tmp_path):
    cfg = grpo_cfg(tmp_path, train_mtp=True, beta=0.0)
    rcfg = cfg.__class__(**{**cfg.__dict__, "train": rl_train_config(cfg)})
    model = Transformer(cfg.model)
    state = init_state(rcfg, model, jax.random.key(0))
    batch = {k: v for k, v in synthetic_batch(cfg).items() if k not in ("old_logp", "ref_logp")}
    new, _ = jax.jit(make_grpo_step(rcfg, model))(state, batch)
    assert max_diff(state.params["mtp_0"], new.params["mtp_0"]) > 1e-4


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_reference_copy_is_a_new_array_in_the_compute_dtype(dtype):
    """The frozen reference: floating weights in model.dtype, integers kept, and never the policy's
    own buffers (which the update donates), even when the dtype does not change."""
    from dsjax.rl.grpo import reference_copy

    params = {"w": jnp.full((2, 3), 1.5, jnp.float32), "ids": jnp.arange(3)}
    ref = reference_copy(params, dtype)
    for leaf in jax.tree.leaves(params):
        leaf.delete()  # what donating the policy's params to the update does
    assert ref["w"].dtype == jnp.dtype(dtype) and ref["ids"].dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(ref["w"], np.float32), np.full((2, 3), 1.5))
    np.testing.assert_array_equal(np.asarray(ref["ids"]), np.arange(3))
