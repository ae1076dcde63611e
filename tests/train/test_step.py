"""dsjax.train.step / .loss: the aux-loss-free bias update (DeepSeek-V3 §2.1.2), loss masking,
microbatches, non-finite steps, and bf16 compute with fp32 master weights."""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dsjax.model import Transformer
from dsjax.train import TrainingError, restore_model, train
from dsjax.train.data import ByteTokenizer, load_splits, train_batches
from dsjax.train.loss import shifted_ce
from dsjax.train.step import init_state, make_train_step, update_bias
from tests.train.runs import small_cfg


def test_bias_update_moves_by_exactly_gamma():
    bias = {
        "moe_layers": {"layers": {"mlp": {"e_score_correction_bias": jnp.zeros((2, 4))}}},
        "mtp_0": {"block": {"mlp": {"e_score_correction_bias": jnp.full((4,), 0.5)}}},
    }
    loads = {"main": jnp.asarray([[10, 2, 2, 2], [4, 4, 4, 4]]), "mtp": jnp.asarray([[0, 8, 4, 4]])}
    new = update_bias(bias, loads, 0.01)
    main = np.asarray(new["moe_layers"]["layers"]["mlp"]["e_score_correction_bias"])
    np.testing.assert_allclose(main, [[-0.01, 0.01, 0.01, 0.01], [0, 0, 0, 0]], atol=1e-7)
    np.testing.assert_allclose(
        np.asarray(new["mtp_0"]["block"]["mlp"]["e_score_correction_bias"]), [0.51, 0.49, 0.5, 0.5], atol=1e-7
    )


def test_bias_update_unrolled_layers_and_unchanged_input():
    bias = {"moe_layers": {f"layer_{i}": {"mlp": {"e_score_correction_bias": jnp.zeros(3)}} for i in range(2)}}
    new = update_bias(bias, {"main": jnp.asarray([[9, 0, 0], [0, 0, 9]]), "mtp": None}, 0.5)
    np.testing.assert_array_equal(
        np.asarray(new["moe_layers"]["layer_0"]["mlp"]["e_score_correction_bias"]), [-0.5, 0.5, 0.5]
    )
    np.testing.assert_array_equal(
        np.asarray(new["moe_layers"]["layer_1"]["mlp"]["e_score_correction_bias"]), [0.5, 0.5, -0.5]
    )
    assert not np.asarray(bias["moe_layers"]["layer_0"]["mlp"]["e_score_correction_bias"]).any()  # input untouched


def test_bias_update_stops_at_the_stop_step(tmp_path):
    cfg = small_cfg(tmp_path, "train.bias_update_rate=0.01", "train.bias_update_stop_step=1", "train.warmup_steps=0")
    model = Transformer(cfg.model)
    state = init_state(cfg, model, jax.random.key(0))
    train, _ = load_splits(cfg.data, cfg.train.seq_len, ByteTokenizer())
    it = train_batches(train, cfg.train.batch_size, 0)
    step = jax.jit(make_train_step(cfg, model))
    s1, _ = step(state, next(it))  # step 0 < 1: gamma applies
    s2, _ = step(s1, next(it))  # step 1: gamma is 0
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool((a != b).any()), s1.bias, state.bias))
    assert all(moved)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), s2.bias, s1.bias)


def test_train_step_bias_update_on_an_overloaded_expert(tmp_path):
    cfg = small_cfg(tmp_path, "train.bias_update_rate=0.01")
    model = Transformer(cfg.model)
    state = init_state(cfg, model, jax.random.key(0))
    # A large bias on expert 0 (every layer) makes every token pick it: overloaded.
    hot = jax.tree.map(lambda b: b.at[..., 0].set(5.0), state.bias)
    state = state.replace(bias=hot)
    train, _ = load_splits(cfg.data, cfg.train.seq_len, ByteTokenizer())
    batch = next(train_batches(train, cfg.train.batch_size, 0))
    new, m = jax.jit(make_train_step(cfg, model))(state, batch)
    assert bool(m["ok"])
    before = np.asarray(hot["moe_layers"]["layers"]["mlp"]["e_score_correction_bias"])
    after = np.asarray(new.bias["moe_layers"]["layers"]["mlp"]["e_score_correction_bias"])
    gamma = np.float32(0.01)
    np.testing.assert_array_equal(after[:, 0], before[:, 0] - gamma)  # overloaded: down by exactly gamma
    moved_up = after == before + gamma
    assert ((after == before - gamma) | moved_up).all()  # every expert moved by exactly gamma
    assert moved_up[:, 1:].any()  # an idle one went up


@pytest.mark.slow
def test_bias_balancing_lowers_the_load_imbalance(tmp_path):
    def final_imbalance(gamma):
        cfg = small_cfg(
            tmp_path,
            f"train.bias_update_rate={gamma}",
            "train.steps=40",
            f"train.run_name=g{gamma}",
            "train.eval_every=100",
            "train.checkpoint_every=100",
        )
        train(cfg, progress=False)
        rows = [json.loads(x) for x in (tmp_path / f"g{gamma}" / "metrics.jsonl").read_text().splitlines()]
        loads = [r["load_max_mean"] for r in rows if "load_max_mean" in r]
        return float(np.mean(loads[-10:]))

    free, balanced = final_imbalance(0.0), final_imbalance(0.01)
    print(f"max/mean expert load over the last 10 of 40 steps: gamma=0 {free:.3f}, gamma=0.01 {balanced:.3f}")
    assert balanced < free


def test_shifted_ce_masks_padding_and_document_boundaries():
    logits = jnp.zeros((1, 6, 5))  # uniform: every valid target costs ln 5
    tokens = jnp.asarray([[1, 2, 3, 4, 0, 0]])
    seg = jnp.asarray([[1, 1, 2, 2, 0, 0]])
    # valid (i -> i+1): 0->1 (doc 1), 2->3 (doc 2); not 1->2 (boundary), not padding.
    assert float(shifted_ce(logits, tokens, seg, 1)) == pytest.approx(2 * math.log(5))
    assert float(shifted_ce(logits, tokens, seg, 2)) == 0.0  # no doc is long enough for t+2


def test_microbatches_equal_one_big_batch(tmp_path):
    base = small_cfg(tmp_path, "train.batch_size=4")
    train, _ = load_splits(base.data, base.train.seq_len, ByteTokenizer())
    batch = next(train_batches(train, 4, 0))
    states = []
    for micro in (1, 2):
        # eps=1 makes Adam's first step ~ lr * g (not ~ lr * sign(g), which would amplify fp32
        # summation-order noise in near-zero gradients): the parameters then compare the gradients.
        cfg = small_cfg(
            tmp_path, "train.batch_size=4", f"train.microbatches={micro}", "train.warmup_steps=0", "train.eps=1.0"
        )
        model = Transformer(cfg.model)
        state = init_state(cfg, model, jax.random.key(0))
        states.append(jax.jit(make_train_step(cfg, model))(state, batch))
    (s1, m1), (s2, m2) = states
    assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-5)
    assert float(m1["grad_norm"]) == pytest.approx(float(m2["grad_norm"]), rel=1e-4)
    # Equal to fp32 rounding (summation order differs): a few ulps.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9),
        s1.params,
        s2.params,
    )
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), s1.bias, s2.bias)


class NaNOnMarker(Transformer):
    """Test double: a batch whose first token is 255 gives NaN logits (an 'injected bad batch')."""

    def __call__(self, tokens, segment_ids=None, positions=None):
        out = super().__call__(tokens, segment_ids, positions)
        bad = tokens[0, 0] == 255
        return out.replace(logits=jnp.where(bad, jnp.nan, out.logits))


def test_nonfinite_step_is_skipped_and_counted(tmp_path):
    cfg = small_cfg(tmp_path)
    model = NaNOnMarker(cfg.model)
    state = init_state(cfg, model, jax.random.key(0))
    train, _ = load_splits(cfg.data, cfg.train.seq_len, ByteTokenizer())
    good = next(train_batches(train, cfg.train.batch_size, 0))
    good["tokens"] = good["tokens"].copy()
    good["tokens"][0, 0] = 10
    bad = dict(good, tokens=good["tokens"].copy())
    bad["tokens"][0, 0] = 255
    step = jax.jit(make_train_step(cfg, model))
    after_bad, m = step(state, bad)
    assert not bool(m["ok"]) and int(after_bad.skipped) == 1 and int(after_bad.nonfinite) == 1
    assert int(after_bad.step) == int(state.step)
    for a, b in zip(
        jax.tree.leaves((after_bad.params, after_bad.opt_state, after_bad.bias)),
        jax.tree.leaves((state.params, state.opt_state, state.bias)),
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    after_good, m = step(after_bad, good)  # training goes on
    assert bool(m["ok"]) and int(after_good.nonfinite) == 0 and int(after_good.skipped) == 1
    assert int(after_good.step) == int(state.step) + 1


def test_training_stops_after_consecutive_nonfinite_steps(tmp_path):
    cfg = small_cfg(tmp_path, "train.max_nonfinite_steps=3", "train.steps=10", "train.checkpoint_every=2")

    class NaNOnceParamsMoved(Transformer):
        def __call__(self, tokens, segment_ids=None, positions=None):
            out = super().__call__(tokens, segment_ids, positions)
            moved = nn.meta.unbox(self.variables)["params"]["norm"]["scale"][0] != 1.0
            return out.replace(logits=jnp.where(moved, jnp.nan, out.logits))

    # Step 1 has lr 0 (warmup), step 2 moves the parameters, steps 3-5 are NaN and skipped.
    with pytest.raises(TrainingError, match=r"3 consecutive non-finite steps at step 5.*checkpoints/4 \(step 4\)"):
        train(cfg, model=NaNOnceParamsMoved(cfg.model), progress=False)
    rows = [json.loads(x) for x in (tmp_path / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("skipped_nonfinite", 0) for r in rows) == 3
    # The checkpoint taken during the streak holds the last good parameters (step 2's), all finite.
    _, at2 = restore_model(tmp_path / "tiny", step=2)
    _, at4 = restore_model(tmp_path / "tiny", step=4)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), at2, at4)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(at4))


def test_bf16_compute_keeps_fp32_master_weights(tmp_path):
    """V3's mixed precision: bf16 compute, fp32 master weights, Adam moments in bf16 (``moment_dtype``;
    the default keeps them fp32, test_bf16_adam_moments_follow_plain_adamw_with_bf16_storage)."""
    cfg = small_cfg(tmp_path, "model.dtype=bfloat16", "model.param_dtype=float32", "train.moment_dtype=bfloat16")
    model = Transformer(cfg.model)
    state = init_state(cfg, model, jax.random.key(0))
    train, _ = load_splits(cfg.data, cfg.train.seq_len, ByteTokenizer())
    new, m = jax.jit(make_train_step(cfg, model))(state, next(train_batches(train, cfg.train.batch_size, 0)))
    assert bool(m["ok"]) and 4.0 < float(m["ce"]) < 7.0  # ~ln(259) at init
    assert {x.dtype for x in jax.tree.leaves(new.params)} == {jnp.dtype(jnp.float32)}
    adam = new.opt_state[1][0]
    assert jax.tree.structure(adam.mu) == jax.tree.structure(adam.nu) == jax.tree.structure(new.params)
    assert {x.dtype for x in jax.tree.leaves((adam.mu, adam.nu))} == {jnp.dtype(jnp.bfloat16)}
    assert float(optax.tree.norm(adam.nu)) > 0  # updated, not left at init
