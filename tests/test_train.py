"""Training: schedule, weight-decay mask, aux-loss-free bias update, loss masking, microbatches,
non-finite steps, data pipeline and checkpoint resume."""

import dataclasses
import json
import math
import re
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

import train as train_script
from dsjax import checkpoint as ckpt
from dsjax.config import ConfigError, TrainConfig, load_config
from dsjax.data import (
    ByteTokenizer,
    DataError,
    HFTokenizer,
    is_validation,
    split_keys,
    load_splits,
    make_tokenizer,
    stdlib_files,
    train_batches,
)
from dsjax.model import Transformer
from dsjax.optim import decay_mask, lr_schedule
from dsjax.trainer import init_state, make_train_step, shifted_ce, update_bias

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SMALL_RUN = [  # a fast variant of the tiny config for tests
    "model.num_hidden_layers=2", "model.hidden_size=64", "model.intermediate_size=128",
    "model.q_lora_rank=32", "model.kv_lora_rank=16", "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8",
    "model.v_head_dim=16", "model.moe_intermediate_size=32",
    "train.seq_len=32", "train.batch_size=4", "train.warmup_steps=2", "train.decay_steps=20",
    "train.log_every=1", "train.eval_every=4", "train.eval_batches=2", "train.sample_tokens=0",
    "mesh.data=1",  # one device (tests/conftest.py simulates 8; tests/test_sharding.py uses them)
]  # fmt: skip


def small_cfg(tmp_path, *extra):
    return load_config(TINY, [*SMALL_RUN, f"train.output_dir={tmp_path}", *extra])


# ---------------------------------------------------------------------------------------------
# Optimizer


def test_lr_schedule_shape():
    t = TrainConfig(learning_rate=1.0, warmup_steps=10, constant_steps=5, decay_steps=20, min_lr=0.1,
                    min_lr_steps=3, tail_lr=0.01)  # fmt: skip
    lr = lr_schedule(t)
    expect = {0: 0.0, 5: 0.5, 10: 1.0, 14: 1.0, 15: 1.0, 25: 0.1 + 0.45 * (1 + math.cos(math.pi / 2)),
              35: 0.1, 37: 0.1, 38: 0.01, 1000: 0.01}  # fmt: skip
    for step, want in expect.items():
        assert float(lr(step)) == pytest.approx(want, abs=1e-6), step


def test_weight_decay_mask_excludes_norms():
    cfg = load_config(TINY).model
    params = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    mask = decay_mask(nn.meta.unbox(params))
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
    norms = [k for k in flat if "norm" in k]
    assert norms and not any(flat[k] for k in norms)  # every RMSNorm scale excluded
    for must in ("['embed_tokens']['embedding']", "['lm_head']['kernel']", "['moe_layers']['layers']['mlp']['w_gate']",
                 "['moe_layers']['layers']['mlp']['gate']", "['moe_layers']['layers']['self_attn']['kv_b_proj']['kernel']"):  # fmt: skip
        assert flat[next(k for k in flat if k.endswith(must))], must
    assert "selection_bias" not in str(list(flat))  # the bias is not a parameter at all


def test_bf16_adam_moments_follow_plain_adamw_with_bf16_storage():
    """``moment_dtype: bfloat16`` (V3 report §3.3.3): both moments stored in bf16, each step's new
    moments (and the update) computed in fp32 from the stored ones -- against AdamW written out in
    numpy (global-norm clip, bias correction, decoupled decay on the masked leaves) over 6 steps. The
    fp32 default stays fp32, and its trajectory is not the bf16 one."""
    t = TrainConfig(learning_rate=0.1, warmup_steps=0, decay_steps=4, min_lr=0.01, grad_clip=0.5,
                    weight_decay=0.1, moment_dtype="bfloat16")  # fmt: skip
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "norm": {"scale": jnp.ones(4)}}
    grads = [jax.tree.map(lambda x, k=k: jnp.sin(3.0 * x + k) * 10.0 ** -(k % 3), params) for k in range(6)]
    from dsjax.optim import make_optimizer

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


# ---------------------------------------------------------------------------------------------
# Aux-loss-free balancing


def test_bias_update_moves_by_exactly_gamma():
    bias = {"moe_layers": {"layers": {"mlp": {"e_score_correction_bias": jnp.zeros((2, 4))}}},
            "mtp_0": {"block": {"mlp": {"e_score_correction_bias": jnp.full((4,), 0.5)}}}}  # fmt: skip
    loads = {"main": jnp.asarray([[10, 2, 2, 2], [4, 4, 4, 4]]), "mtp": jnp.asarray([[0, 8, 4, 4]])}
    new = update_bias(bias, loads, 0.01)
    main = np.asarray(new["moe_layers"]["layers"]["mlp"]["e_score_correction_bias"])
    np.testing.assert_allclose(main, [[-0.01, 0.01, 0.01, 0.01], [0, 0, 0, 0]], atol=1e-7)
    np.testing.assert_allclose(np.asarray(new["mtp_0"]["block"]["mlp"]["e_score_correction_bias"]),
                               [0.51, 0.49, 0.5, 0.5], atol=1e-7)  # fmt: skip


def test_bias_update_unrolled_layers_and_unchanged_input():
    bias = {"moe_layers": {f"layer_{i}": {"mlp": {"e_score_correction_bias": jnp.zeros(3)}} for i in range(2)}}
    new = update_bias(bias, {"main": jnp.asarray([[9, 0, 0], [0, 0, 9]]), "mtp": None}, 0.5)
    np.testing.assert_array_equal(np.asarray(new["moe_layers"]["layer_0"]["mlp"]["e_score_correction_bias"]), [-0.5, 0.5, 0.5])
    np.testing.assert_array_equal(np.asarray(new["moe_layers"]["layer_1"]["mlp"]["e_score_correction_bias"]), [0.5, 0.5, -0.5])
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
        cfg = small_cfg(tmp_path, f"train.bias_update_rate={gamma}", "train.steps=40", f"train.run_name=g{gamma}",
                        "train.eval_every=100", "train.checkpoint_every=100")  # fmt: skip
        train_script.train(cfg, progress=False)
        rows = [json.loads(x) for x in (tmp_path / f"g{gamma}" / "metrics.jsonl").read_text().splitlines()]
        loads = [r["load_max_mean"] for r in rows if "load_max_mean" in r]
        return float(np.mean(loads[-10:]))

    free, balanced = final_imbalance(0.0), final_imbalance(0.01)
    print(f"max/mean expert load over the last 10 of 40 steps: gamma=0 {free:.3f}, gamma=0.01 {balanced:.3f}")
    assert balanced < free


# ---------------------------------------------------------------------------------------------
# Loss and steps


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
        cfg = small_cfg(tmp_path, "train.batch_size=4", f"train.microbatches={micro}", "train.warmup_steps=0", "train.eps=1.0")
        model = Transformer(cfg.model)
        state = init_state(cfg, model, jax.random.key(0))
        states.append(jax.jit(make_train_step(cfg, model))(state, batch))
    (s1, m1), (s2, m2) = states
    assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-5)
    assert float(m1["grad_norm"]) == pytest.approx(float(m2["grad_norm"]), rel=1e-4)
    # Equal to fp32 rounding (summation order differs): a few ulps.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9), s1.params, s2.params)
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
    for a, b in zip(jax.tree.leaves((after_bad.params, after_bad.opt_state, after_bad.bias)),
                    jax.tree.leaves((state.params, state.opt_state, state.bias))):  # fmt: skip
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
    with pytest.raises(train_script.TrainingError, match=r"3 consecutive non-finite steps at step 5.*checkpoints/4 \(step 4\)"):
        train_script.train(cfg, model=NaNOnceParamsMoved(cfg.model), progress=False)
    rows = [json.loads(x) for x in (tmp_path / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("skipped_nonfinite", 0) for r in rows) == 3
    # The checkpoint taken during the streak holds the last good parameters (step 2's), all finite.
    _, at2 = ckpt.restore_model(tmp_path / "tiny", step=2)
    _, at4 = ckpt.restore_model(tmp_path / "tiny", step=4)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), at2, at4)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(at4))


# ---------------------------------------------------------------------------------------------
# Data


def test_stdlib_corpus_has_no_tests_or_site_packages():
    files = stdlib_files()
    assert len(files) > 300
    parts = {p for f in files for p in Path(f).parts}
    assert not parts & {"test", "tests", "site-packages", "idle_test"}


def test_split_is_deterministic_and_disjoint():
    files = stdlib_files()
    keys = split_keys(files)
    assert "json/decoder.py" in keys  # relative to the stdlib root: the same split on every machine
    val = [k for k in keys if is_validation(k, 0.05)]
    assert 0 < len(val) < 0.15 * len(files)
    assert val == [k for k in keys if is_validation(k, 0.05)]
    # md5("a.txt") etc. are fixed: none of the three files below is held out at 1%.
    assert not any(is_validation(k, 0.01) for k in split_keys(["/x/a.txt", "/x/b.txt", "/x/c.txt"]))
    assert split_keys(["/x/y/a.txt"]) == ["a.txt"]


def test_packed_windows_keep_documents_apart(tmp_path):
    docs = {"a.txt": b"alpha doc", "b.txt": b"the second document", "c.txt": b"third"}
    for name, text in docs.items():
        (tmp_path / name).write_bytes(text)
    cfg = load_config(TINY, [f"data.paths=['{tmp_path}/*.txt']", "data.validation_fraction=0.01"])
    tok = ByteTokenizer()
    with pytest.warns(UserWarning, match="too few files"):  # 3 files: validation = the stream's tail
        train, val = load_splits(cfg.data, 16, tok)
    assert len(train) == 1 and len(val) == 1
    w = train[0]
    seg, pos = w["segment_ids"], w["positions"]
    assert seg[0] == 1 and seg.max() >= 2
    first_doc = 1 + len(docs["a.txt"]) + 1  # BOS alpha doc EOS
    np.testing.assert_array_equal(seg[:first_doc], 1)
    assert seg[first_doc] == 2 and pos[first_doc] == 0 and w["tokens"][first_doc] == tok.bos_id

    # Through the model: segment 2's logits equal running that piece alone.
    mcfg = load_config(TINY, SMALL_RUN).model
    model = Transformer(mcfg)
    variables = model.init(jax.random.key(0), w["tokens"][None])
    packed = model.apply(variables, w["tokens"][None], w["segment_ids"][None], w["positions"][None]).logits[0]
    piece = w["tokens"][seg == 2]
    alone = model.apply(variables, piece[None]).logits[0]
    np.testing.assert_allclose(np.asarray(packed[seg == 2]), np.asarray(alone), atol=1e-5)


def test_iterator_state_restores_the_same_batches():
    cfg = load_config(TINY)
    train, _ = load_splits(cfg.data, 64, ByteTokenizer())
    it = train_batches(train, 4, seed=7)
    for _ in range(3):
        next(it)
    state = it.get_state()
    want = [next(it)["tokens"] for _ in range(3)]
    again = train_batches(train, 4, seed=7)
    again.set_state(json.loads(json.dumps(state)))  # as saved in the checkpoint (JSON)
    for w in want:
        np.testing.assert_array_equal(next(again)["tokens"], w)
    other = train_batches(train, 4, seed=8)
    assert not np.array_equal(next(other)["tokens"], next(train_batches(train, 4, seed=7))["tokens"])


def test_data_errors_are_clear(tmp_path):
    def load(*overrides, seq=32):
        cfg = load_config(TINY, list(overrides))
        return load_splits(cfg.data, seq, make_tokenizer(cfg.data))

    with pytest.raises(DataError, match="matches no file"):
        load(f"data.paths=['{tmp_path}/nothing/*.txt']")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match="2 tokens, fewer than the two sequences"):  # just BOS + EOS
        load(f"data.paths=['{tmp_path}/empty.txt']")
    (tmp_path / "short.txt").write_bytes(b"x" * 10)
    with pytest.raises(DataError, match="fewer than the two sequences of train.seq_len=32"):
        load(f"data.paths=['{tmp_path}/short.txt']")
    bad = tmp_path / "ids.npy"
    np.save(bad, np.asarray([1, 2, 999]))
    with pytest.raises(DataError, match=r"ids.npy: token ids must lie in \[0, 259\)"):
        load(f"data.paths=['{bad}']")
    with pytest.raises(DataError, match="no such tokenizer.json"):
        load("data.tokenizer=/nonexistent/tokenizer.json")


def test_hf_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(["def f(x):\n    return x + 1\n"] * 50, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "doc.py").write_text("def g(y):\n    return y * 2\n" * 40)
    cfg = load_config(TINY, [f"data.tokenizer={tmp_path / 'tokenizer.json'}", f"data.paths=['{tmp_path}/*.py']"])
    t = make_tokenizer(cfg.data)
    assert isinstance(t, HFTokenizer) and t.eos_id == tok.token_to_id("</s>") and t.bos_id == tok.token_to_id("<s>")
    with pytest.warns(UserWarning, match="too few files"):  # one file: validation = its tail
        train, _ = load_splits(cfg.data, 16, t)
    assert train.tokens[0] == t.bos_id and train.tokens.max() < t.vocab_size
    assert "return y" in t.decode(train.tokens[:20])


def test_config_errors_before_compiling(capsys):
    assert train_script.main(["train.stepz=3"]) == 2
    assert "train.stepz: unknown key; did you mean 'steps'?" in capsys.readouterr().err
    assert train_script.main(["train.batch_size=6", "train.microbatches=4"]) == 2
    assert "train.batch_size=6: must be divisible by train.microbatches=4" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="train.seq_len='long': must be an integer"):
        load_config(TINY, ["train.seq_len=long"])


def test_kernel_choices_the_devices_cannot_run_are_config_errors(tmp_path, capsys, monkeypatch):
    """'pallas' kernels on this CPU suite's devices, or a bad DSJAX_FP8_IMPL: an error naming the
    choice, exit code 2, before the run directory is made or anything traced."""
    out = [f"train.output_dir={tmp_path}"]
    assert jax.default_backend() == "cpu"  # the suite's platform: 'pallas' cannot run here
    assert train_script.main([*out, "model.attention_impl=pallas"]) == 2
    assert "attention_impl='pallas' needs a TPU or GPU, this is 'cpu'" in capsys.readouterr().err
    assert train_script.main([*out, "model.fp8=true", "model.fp8_impl=pallas"]) == 2
    assert "fp8 impl='pallas' needs a TPU or GPU, backend is 'cpu'" in capsys.readouterr().err
    monkeypatch.setenv("DSJAX_FP8_IMPL", "triton")
    assert train_script.main([*out, "model.fp8=true"]) == 2
    assert "fp8 impl='triton': expected one of auto, pallas, interpret, xla" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# Checkpoints


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
def test_resume_is_bitwise_identical(tmp_path):
    n = 4
    common = ["train.checkpoint_every=4", f"train.steps={2 * n}"]
    whole = small_cfg(tmp_path, *common, "train.run_name=whole")
    train_script.train(whole, progress=False)

    part = small_cfg(tmp_path, *common, "train.run_name=part")
    first = small_cfg(tmp_path, "train.checkpoint_every=4", f"train.steps={n}", "train.run_name=part")
    train_script.train(first, progress=False)  # stops after step n, like a kill right after its checkpoint
    with pytest.raises(train_script.TrainingError, match="already holds checkpoints"):
        train_script.train(part, progress=False)  # nothing is overwritten without --resume
    train_script.train(part, resume=True, progress=False)

    assert losses(tmp_path / "part") == losses(tmp_path / "whole")  # exact floats, every step
    _, a = ckpt.restore_model(tmp_path / "whole")
    _, b = ckpt.restore_model(tmp_path / "part")
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.mark.slow
def test_killed_during_save_resumes_from_last_complete_checkpoint(tmp_path):
    cfg = small_cfg(tmp_path, "train.checkpoint_every=2", "train.steps=4")
    train_script.train(cfg, progress=False)
    ckdir = tmp_path / "tiny" / "checkpoints"
    # A save interrupted by a kill leaves orbax's temporary directory behind.
    (ckdir / "6.orbax-checkpoint-tmp-1234").mkdir()
    (ckdir / "6.orbax-checkpoint-tmp-1234" / "partial").write_text("garbage")
    longer = small_cfg(tmp_path, "train.checkpoint_every=2", "train.steps=6")
    last = train_script.train(longer, resume=True, progress=False)
    assert last["step"] == 6
    assert losses(tmp_path / "tiny").keys() == set(range(1, 7))


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


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    """A real kill (SIGKILL, at whatever point the run has reached) loses nothing."""
    import os
    import signal
    import subprocess
    import sys
    import time

    args = [*SMALL_RUN, f"train.output_dir={tmp_path}", "train.checkpoint_every=2", "train.eval_every=100"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args, "train.run_name=killed", "train.steps=400"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    ckdir = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    while not (ckdir / "2").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (ckdir / "2").is_dir(), "the run never wrote its first checkpoint"

    steps = 8
    resumed = small_cfg(tmp_path, "train.checkpoint_every=2", "train.eval_every=100", "train.run_name=killed", f"train.steps={steps}")
    last = train_script.train(resumed, resume=True, progress=False)
    whole = small_cfg(tmp_path, "train.checkpoint_every=2", "train.eval_every=100", "train.run_name=whole", f"train.steps={steps}")
    train_script.train(whole, progress=False)
    assert last["step"] == steps
    assert losses(tmp_path / "killed") == losses(tmp_path / "whole")
    _, a = ckpt.restore_model(tmp_path / "killed", step=steps)
    _, b = ckpt.restore_model(tmp_path / "whole", step=steps)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _fake_run(out: Path, variant: str, seed: int, final: float, done=300, extra=(), cut=False):
    """A finished-looking bench.fp8_train run: its saved config and metrics rows (no training)."""
    from bench.fp8_train import VARIANTS

    cfg = load_config(TINY, [*extra, *VARIANTS[variant], f"train.seed={seed}", f"train.run_name={variant}_seed{seed}",
                             f"train.output_dir={out}", "train.steps=300"])  # fmt: skip
    ckpt.save_config(cfg, out / f"{variant}_seed{seed}")
    rows = [{"step": s, "loss": 9.0} for s in (10, 20)]
    rows += [{"step": s, "val_loss": final if s == done else 2.5} for s in range(100, done + 1, 100)]
    text = "".join(json.dumps(r) + "\n" for r in rows) + ('{"step": 310, "lo' if cut else "")
    (out / f"{variant}_seed{seed}" / "metrics.jsonl").write_text(text)


def test_fp8_quality_summary_pools_pairs_across_output_dirs(tmp_path):
    """`bench.fp8_train --summarize`: pairs by seed over several output dirs, unfinished runs set
    aside, a repeated run counted once; mean, standard error and the t-interval against numpy and
    the tabulated t quantile (df 4: 2.7764), and the pairs that bound the mean inside 0.5%."""
    from bench.fp8_train import main

    a, b = tmp_path / "a", tmp_path / "b"
    base = [2.0, 1.9, 1.95, 2.05, 1.98]
    fp8 = [2.01, 1.88, 1.97, 2.05, 2.02]
    for s in range(5):
        _fake_run(a if s < 3 else b, "baseline", s, base[s])
        _fake_run(a if s % 2 else b, "fp8", s, fp8[s], cut=s == 4)
    _fake_run(b, "baseline", 1, base[1])  # a rerun, same result: counted once
    _fake_run(b, "fp8", 7, 2.2, done=200)  # stopped at step 200: unfinished, not paired
    out = main(["--summarize", str(a), str(b)])
    rel = np.array(fp8) / np.array(base) - 1
    assert out["pairs"] == 5 and [r["seed"] for r in out["fp8"]] == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(out["val_loss_relative_difference"], rel, atol=1e-5)
    np.testing.assert_allclose(out["mean_relative_difference"], rel.mean(), atol=1e-5)
    se = rel.std(ddof=1) / math.sqrt(5)
    np.testing.assert_allclose(out["standard_error"], se, atol=1e-5)
    np.testing.assert_allclose(out["interval_95"], [rel.mean() - 2.7764 * se, rel.mean() + 2.7764 * se], atol=1e-5)
    assert out["pairs_within_target"] == int((np.abs(rel) <= 0.005).sum())
    need = (1.96 * rel.std(ddof=1) / (0.005 - abs(rel.mean()))) ** 2
    assert out["pairs_for_interval_inside_target"] == math.ceil(need)
    assert len(out["unfinished"]) == 1 and "fp8_seed7" in out["unfinished"][0] and "step 200" in out["unfinished"][0]
    assert "control" not in out
    # each arm's spread, their correlation, and the Brown-Forsythe test of equal spreads written out:
    # a one-way ANOVA F on the distances from each arm's median
    x, y = np.array(base), np.array(fp8)
    for arm, v in (("baseline", x), ("fp8", y)):
        np.testing.assert_allclose(out["seed_spread"][arm], v.std(ddof=1) / v.mean(), atol=1e-5)
    np.testing.assert_allclose(out["seed_correlation"], np.corrcoef(x, y)[0, 1], atol=1e-4)
    z = [np.abs(v - np.median(v)) for v in (x, y)]
    zbar = np.concatenate(z).mean()
    f_stat = 8 * sum(5 * (zi.mean() - zbar) ** 2 for zi in z) / sum(((zi - zi.mean()) ** 2).sum() for zi in z)
    np.testing.assert_allclose(out["equal_spread_p"], scipy.stats.f.sf(f_stat, 1, 8), rtol=1e-3)


def test_fp8_quality_branched_runs_are_marked_and_never_pooled_with_runs_from_scratch(tmp_path, monkeypatch):
    """`--branch-at`'s runs start from their baseline's checkpoint (copied, with the metrics up to it)
    and say so in a marker; `--summarize` reports the step, and refuses to pool them with FP8 runs
    from scratch, whose configs are the same. A branch cut off midway leaves no run behind."""
    from bench.fp8_train import branch, branched_at, main

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for s in (0, 1):
        _fake_run(a, "baseline", s, 2.0 + s / 10)
        (a / f"baseline_seed{s}" / "checkpoints" / "200").mkdir(parents=True)
        (a / f"baseline_seed{s}" / "checkpoints" / "200" / "commit_success.txt").write_text("")
        cfg = load_config(TINY, ["model.fp8=true", f"train.seed={s}", f"train.run_name=fp8_seed{s}", f"train.output_dir={b}"])
        branch(a / f"baseline_seed{s}", cfg, 200)
        started = [json.loads(r) for r in (b / f"fp8_seed{s}" / "metrics.jsonl").read_text().splitlines()]
        assert max(r["step"] for r in started) == 200 and (b / f"fp8_seed{s}" / "checkpoints" / "200").is_dir()
        _fake_run(b, "fp8", s, 2.01 + s / 10)  # as if it had trained on to step 300
    with pytest.raises(SystemExit, match="already holds checkpoints"):
        branch(a / "baseline_seed0", cfg, 200)  # a run that already has checkpoints is never overwritten

    cut = load_config(TINY, ["model.fp8=true", "train.seed=0", "train.run_name=fp8_seed0", f"train.output_dir={c}"])
    with monkeypatch.context() as m:  # the call is cut off after the checkpoint was copied
        m.setattr(ckpt, "save_config", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            branch(a / "baseline_seed0", cut, 200)
    assert not (c / "fp8_seed0").exists()  # no half-branched run, which a next call would take for one from scratch
    branch(a / "baseline_seed0", cut, 200)  # the next call branches it whole
    assert branched_at(c / "fp8_seed0") == 200 and (c / "fp8_seed0" / "checkpoints" / "200").is_dir()
    assert [p.name for p in c.iterdir()] == ["fp8_seed0"]
    (c / "fp8_seed0" / "checkpoints").rename(c / "moved")  # left: files of a run, e.g. one from scratch just started
    with pytest.raises(SystemExit, match="already holds files of another run"):
        branch(a / "baseline_seed0", cut, 200)
    shutil.rmtree(c)
    out = main(["--summarize", str(a), str(b)])
    assert out["branch_at"] == 200 and out["pairs"] == 2
    _fake_run(c, "fp8", 2, 2.2)
    _fake_run(c, "baseline", 2, 2.2)
    assert main(["--summarize", str(c)])["branch_at"] is None
    with pytest.raises(SystemExit, match=f"{c / 'fp8_seed2'} was run from scratch, {b / 'fp8_seed0'} branched at step 200"):
        main(["--summarize", str(a), str(b), str(c)])


def test_fp8_quality_call_cut_short_picks_up_where_it_stopped(tmp_path, monkeypatch):
    """Called again on the same output dir, `bench.fp8_train` reuses a finished run (no training),
    resumes one with checkpoints, and starts the missing ones; a run dir left by a different
    experiment (other settings, or from scratch where this call branches) is refused, untouched."""
    from bench.fp8_train import main

    calls = []

    def fake_train(cfg, resume=False, progress=True):  # records the call instead of training
        calls.append((cfg.train.run_name, resume))
        return {"step": cfg.train.steps, "val_loss": 2.25, "loss": 2.0}

    monkeypatch.setattr(train_script, "train", fake_train)
    same = ["train.sample_tokens=0"]  # what bench.fp8_train sets on every run
    was, out = tmp_path / "was", tmp_path / "out"
    _fake_run(was, "baseline", 0, 2.0, extra=same)  # finished
    _fake_run(was, "fp8", 0, 2.1, done=200, extra=same)  # cut after its step-200 checkpoint
    (was / "fp8_seed0" / "checkpoints" / "200").mkdir(parents=True)
    was.rename(out)  # moved since: still the same runs
    report = main(["--seeds", "0", "1", "--output-dir", str(out)])
    assert calls == [("fp8_seed0", True), ("baseline_seed1", True), ("fp8_seed1", True)]
    assert report["baseline"][0]["val_loss"] == 2.0 and report["baseline"][0]["reused"]
    assert [r["val_loss"] for r in report["fp8"]] == [2.25, 2.25]

    calls.clear()
    other = tmp_path / "other"
    _fake_run(other, "baseline", 0, 2.0, extra=[*same, "train.learning_rate=0.001"])
    with pytest.raises(SystemExit, match=r"baseline_seed0 holds a run with other settings \(train.learning_rate differ\)"):
        main(["--seeds", "0", "--output-dir", str(other)])
    scratch = tmp_path / "scratch"  # an FP8 run from scratch where a --branch-at call would branch
    _fake_run(scratch, "baseline", 0, 2.0, extra=[*same, "train.keep_checkpoints=4"])
    _fake_run(scratch, "fp8", 0, 2.1, done=200, extra=[*same, "train.keep_checkpoints=4"])
    (scratch / "fp8_seed0" / "checkpoints" / "200").mkdir(parents=True)
    with pytest.raises(SystemExit, match="fp8_seed0 holds a run from scratch, this call asks for one branched at step 200"):
        main(["--seeds", "0", "--branch-at", "200", "--output-dir", str(scratch)])
    assert calls == [] and (scratch / "fp8_seed0" / "checkpoints" / "200").is_dir()


def test_fp8_quality_runs_compile_once_per_machine(tmp_path, monkeypatch):
    """Each run of `bench.fp8_train` uses a persistent compilation cache in its output dir, one folder
    per machine: a later seed's runs load what the first compiled (no new entry); outside a run
    nothing is cached, and a cache the user set is left alone."""
    from jax.experimental.compilation_cache import compilation_cache

    before = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # cache even this test's tiny program
    try:
        _check_runs_compile_once(tmp_path, monkeypatch)
    finally:
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
        compilation_cache.reset_cache()


def _check_runs_compile_once(tmp_path, monkeypatch):
    from bench.common import environment
    from bench.fp8_train import main

    seen = []

    def fake_train(cfg, resume=False, progress=True):  # compiles the same program in every run
        seen.append(jax.config.jax_compilation_cache_dir)
        jax.jit(lambda x: jnp.tanh(x) * 3.0 + cfg.train.steps).lower(jnp.ones(7)).compile()
        return {"step": cfg.train.steps, "val_loss": 2.25, "loss": 2.0}

    monkeypatch.setattr(train_script, "train", fake_train)
    jax.jit(lambda x: x - 2.0).lower(jnp.ones(2)).compile()  # a process that compiled before, uncached
    out = tmp_path / "out"
    main(["--seeds", "0", "--output-dir", str(out)])
    cache = out / ".jax_cache"
    assert [p.name for p in cache.iterdir()] == [re.sub(r"[^\w.-]+", "_", environment()["machine"])]
    entries = sorted(p.name for p in cache.rglob("*") if p.is_file())
    assert entries and set(seen) == {str(next(cache.iterdir()))}
    main(["--seeds", "1", "--output-dir", str(out)])
    assert sorted(p.name for p in cache.rglob("*") if p.is_file()) == entries  # loaded, not compiled again
    assert jax.config.jax_compilation_cache_dir is None  # and off again after the runs
    jax.jit(lambda x: x * 5.0 - 1.0).lower(jnp.ones(3)).compile()
    assert sorted(p.name for p in cache.rglob("*") if p.is_file()) == entries

    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
    seen.clear()
    main(["--seeds", "2", "--output-dir", str(out)])
    assert set(seen) == {str(tmp_path / "mine")} and jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")


@pytest.mark.parametrize("case", ["rerun differs", "other experiment", "mislabeled"])
def test_fp8_quality_summary_refuses_runs_it_cannot_pair(tmp_path, case):
    from bench.fp8_train import main

    a, b = tmp_path / "a", tmp_path / "b"
    _fake_run(a, "baseline", 0, 2.0)
    _fake_run(a, "fp8", 0, 2.01)
    if case == "rerun differs":
        _fake_run(b, "fp8", 0, 2.02)
        match = "fp8_seed0 finished in .* with different losses"
    elif case == "other experiment":
        _fake_run(b, "fp8", 1, 2.02, extra=["train.learning_rate=0.001"])
        match = "different experiments \\(train.learning_rate differ\\)"
    else:
        _fake_run(b, "baseline", 1, 2.02)
        (b / "baseline_seed1").rename(b / "fp8_seed1")
        match = "named fp8 but its config lacks"
    with pytest.raises(SystemExit, match=match):
        main(["--summarize", str(a), str(b)])


def test_fp8_quality_pairs_file_pools_recorded_pairs_and_records_new_ones(tmp_path, monkeypatch):
    """`--summarize DIR --pairs FILE`: the pairs recorded in FILE (the repository's record; run dirs
    stay on the machine that ran them) pool with the dirs' finished pairs, one report per machine;
    `--record` appends only the pairs FILE lacks, each with the machine it finished on (a run's
    environment.json, else this machine). Pairs of another experiment, branched runs, a seed recorded
    with other losses and a pair split over two machines are refused, the file untouched."""
    from bench import fp8_train
    from bench.fp8_train import experiment, main

    monkeypatch.setattr(fp8_train, "environment", lambda: {"machine": "here", "date": "2026-12-02", "jax": "0.12"})
    exp = experiment(load_config(TINY, ["train.steps=300"]))  # what _fake_run's runs share
    pairs = tmp_path / "pairs.jsonl"
    head = json.dumps({"experiment": exp}) + "\n"
    old = [{"seed": 0, "baseline": 2.0, "fp8": 2.03, "machine": "A"}, {"seed": 1, "baseline": 1.9, "fp8": 1.88, "machine": "A"}]
    pairs.write_text(head + "".join(json.dumps(p) + "\n" for p in old))
    d = tmp_path / "runs"
    for seed, b, f in ((1, 1.9, 1.88), (2, 1.95, 1.96), (3, 2.05, 2.0)):  # seed 1: the recorded pair, found again
        _fake_run(d, "baseline", seed, b)
        _fake_run(d, "fp8", seed, f)
    for v in ("baseline", "fp8"):  # seed 2 finished where environment.json says; seed 3 before it was written
        (d / f"{v}_seed2" / "environment.json").write_text(json.dumps({"machine": "B", "date": "2026-12-01", "jax": "0.11.2"}))

    out = main(["--summarize", str(d), "--pairs", str(pairs)])
    rel = np.array([2.03 / 2.0, 1.88 / 1.9, 1.96 / 1.95, 2.0 / 2.05]) - 1
    assert out["pairs"] == 4 and "recorded" not in out
    np.testing.assert_allclose(out["mean_relative_difference"], rel.mean(), atol=1e-5)
    np.testing.assert_allclose(out["standard_error"], rel.std(ddof=1) / 2, atol=1e-5)
    assert out["by_machine"]["A"]["pairs"] == 2 and out["by_machine"]["B"]["pairs"] == 1 and out["by_machine"]["None"]["pairs"] == 1
    np.testing.assert_allclose(out["by_machine"]["A"]["mean_relative_difference"], rel[:2].mean(), atol=1e-5)
    assert pairs.read_text() == head + "".join(json.dumps(p) + "\n" for p in old)  # without --record: unchanged

    recording = main(["--summarize", str(d), "--pairs", str(pairs), "--record"])
    assert recording["recorded"] == [2, 3] and set(recording["by_machine"]) == {"A", "B", "here"}
    rows = [json.loads(r) for r in pairs.read_text().splitlines()[1:]]
    assert [(r["seed"], r["baseline"], r["fp8"], r["machine"], r["date"]) for r in rows[2:]] == [
        (2, 1.95, 1.96, "B", "2026-12-01"), (3, 2.05, 2.0, "here", "2026-12-02")]  # fmt: skip
    assert main(["--summarize", str(d), "--pairs", str(pairs), "--record"])["recorded"] == []  # nothing twice
    alone = main(["--summarize", "--pairs", str(pairs)])  # the record alone: the same report
    np.testing.assert_allclose(alone["mean_relative_difference"], rel.mean(), atol=1e-5)
    assert alone["by_machine"]["here"]["pairs"] == 1

    kept = pairs.read_text()
    other, rerun, branched, split = (tmp_path / n for n in ("other", "rerun", "branched", "split"))
    _fake_run(other, "baseline", 5, 2.0, extra=["train.learning_rate=0.001"])
    _fake_run(rerun, "baseline", 0, 2.01)  # seed 0 again, elsewhere: not the recorded pair
    _fake_run(branched, "baseline", 6, 2.0)
    _fake_run(branched, "fp8", 6, 2.0)
    (branched / "fp8_seed6" / "branched_from.json").write_text(json.dumps({"source": "x", "step": 200}))
    for v, host in (("baseline", "B"), ("fp8", "C")):
        _fake_run(split, v, 7, 2.0)
        (split / f"{v}_seed7" / "environment.json").write_text(json.dumps({"machine": host, "date": "d", "jax": "j"}))
    for where, match in ((other, r"records another experiment \(train.learning_rate differ\)"),
                         (rerun, "seed 0's baseline run ended at 2.01, .* records 2.0 \\(on A\\)"),
                         (branched, "branched at step 200; .* records pairs from scratch"),
                         (split, "seed 7's runs finished on B and C: not a pair")):  # fmt: skip
        with pytest.raises(SystemExit, match=match):
            main(["--summarize", str(where), "--pairs", str(pairs), "--record"])
    assert pairs.read_text() == kept
    with pytest.raises(SystemExit, match="not a pairs file"):
        main(["--summarize", "--pairs", str(tmp_path / "missing.jsonl")])
