"""Whole-model tests: parity with HF transformers (every fixture, V2 to V4), MTP against a numpy
restatement of DeepSeek-V3 §2.2 (eq. 21-23), scan vs unrolled, bf16, packed sequences, and compile size
independent of depth."""

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.config import load_config
from dsjax.model import Transformer, build_model
from dsjax.model.block import Block, Stack
from dsjax.model.transformer import segment_positions

TINY = Path(__file__).parents[2] / "configs" / "tiny.yaml"


def test_fixtures_present(fixtures_dir):
    assert len(list(fixtures_dir.glob("*/reference.npz"))) == 9, "run tools/make_hf_reference.py"


def test_logits_match_hf_transformers(hf_fixture, load_hf_fixture):
    cfg, variables, ref = load_hf_fixture(hf_fixture)
    logits = build_model(cfg).apply(variables, jnp.asarray(ref["input_ids"])).logits
    assert logits.shape == ref["logits"].shape
    print(f"\n{hf_fixture}: max |logits - HF| = {np.abs(np.asarray(logits) - ref['logits']).max():.1e}")
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=1e-4, rtol=0)


def test_unrolled_stack_matches_hf_and_scan(load_hf_fixture):
    name = "v3_deep_dense2"  # 2 dense + 2 MoE layers
    cfg, scanned, ref = load_hf_fixture(name)
    ucfg, unrolled, _ = load_hf_fixture(name, scan_layers=False)
    assert "layer_1" in unrolled["params"]["moe_layers"] and "layers" in scanned["params"]["moe_layers"]
    tokens = jnp.asarray(ref["input_ids"])
    out_s = Transformer(cfg).apply(scanned, tokens)
    out_u = Transformer(ucfg).apply(unrolled, tokens)
    np.testing.assert_allclose(np.asarray(out_u.logits), ref["logits"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(out_u.logits), np.asarray(out_s.logits), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(out_u.router.expert_counts), np.asarray(out_s.router.expert_counts))


def test_bf16_forward_within_bf16_tolerance(load_hf_fixture):
    cfg, variables, ref = load_hf_fixture("v3_qlora_groups")
    # Routing is discrete: with this fixture's ~1e-3 routing margins, bf16 rounding flips an expert
    # choice for a few tokens (their logits then move by ~0.5, as they would in any bf16 model).
    # Pin the choices with a large bias (weights still come from the unbiased scores) so the test
    # measures arithmetic precision alone; the fp32 path it compares with is checked against HF.
    bias = variables["selection_bias"]["moe_layers"]["layers"]["mlp"]
    bias["e_score_correction_bias"] = np.tile(np.linspace(0, 7, cfg.n_routed_experts, dtype=np.float32), (2, 1))
    tokens = jnp.asarray(ref["input_ids"])
    want = np.asarray(Transformer(cfg).apply(variables, tokens).logits)

    bcfg = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    bvars = {
        "params": jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), variables["params"]),
        "selection_bias": variables["selection_bias"],
    }  # the bias stays fp32
    logits = np.asarray(Transformer(bcfg).apply(bvars, tokens).logits)
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
    err, scale = np.abs(logits - want), np.abs(want).max()
    # bf16 keeps 8 mantissa bits (2^-8 = 0.4% per rounding); 3 layers of matmuls and norms.
    assert err.max() <= 0.03 * scale, (err.max(), scale)
    assert err.mean() <= 0.005 * scale, (err.mean(), scale)
    assert err.max() > 1e-4  # it really ran in bf16


def test_packed_documents_equal_separate_runs(load_hf_fixture):
    cfg, variables, ref = load_hf_fixture("v3_qlora_groups")
    model = Transformer(cfg)
    tokens = jnp.asarray(ref["input_ids"])
    a, b = tokens[0, :10], tokens[1, :14]
    packed = jnp.concatenate([a, b])[None]
    segments = jnp.asarray([[1] * 10 + [2] * 14])
    out = model.apply(variables, packed, segment_ids=segments).logits[0]
    alone_a = model.apply(variables, a[None]).logits[0]
    alone_b = model.apply(variables, b[None]).logits[0]
    np.testing.assert_allclose(np.asarray(out[:10]), np.asarray(alone_a), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(out[10:]), np.asarray(alone_b), atol=1e-5, rtol=0)
    # Same tokens without segment ids do attend across the boundary: the test can fail.
    joined = model.apply(variables, packed).logits[0]
    assert np.abs(np.asarray(joined[10:]) - np.asarray(alone_b)).max() > 1e-3


def test_segment_positions_restart_per_document():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0]])
    np.testing.assert_array_equal(np.asarray(segment_positions(seg)), [[0, 1, 2, 0, 1, 0, 0, 1]])


def test_padding_is_excluded_from_router_counts(load_hf_fixture):
    cfg, variables, ref = load_hf_fixture("v3_qlora_groups")
    tokens = jnp.asarray(ref["input_ids"])
    seg = jnp.ones_like(tokens).at[:, 20:].set(0)  # last 4 tokens of each row are padding
    out = Transformer(cfg).apply(variables, tokens, segment_ids=seg)
    counts = np.asarray(out.router.expert_counts)  # [moe layers, E]
    assert counts.shape == (cfg.num_moe_layers, cfg.n_routed_experts)
    np.testing.assert_array_equal(counts.sum(-1), 2 * 20 * cfg.num_experts_per_tok)


# ---------------------------------------------------------------------------------------------
# MTP vs an independent numpy statement of DeepSeek-V3 §2.2 on the same weights:
#   h'_i = W_eh [enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)],  h^k = Block_k(h'),
#   logits^k = lm_head(shared_head_norm(h^k)),  h^0 = main model's last hidden state (pre-norm).


def np_rmsnorm(x, w, eps):
    x = x.astype(np.float64)
    return w * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


@pytest.fixture(scope="module")
def mtp_setup():
    cfg = load_config(TINY, ["model.num_nextn_predict_layers=2", "model.num_hidden_layers=3"]).model
    model = Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, cfg.vocab_size)
    variables = model.init(jax.random.key(0), tokens)
    variables = jax.tree.map(np.asarray, nn.meta.unbox(variables))
    # Make every norm non-trivial so a swapped or missing norm shows.
    rng = np.random.default_rng(0)
    for d in range(2):
        for n in ("enorm", "hnorm", "shared_head_norm"):
            p = variables["params"][f"mtp_{d}"][n]
            p["scale"] = (1 + 0.3 * rng.standard_normal(p["scale"].shape)).astype(np.float32)
    return cfg, model, tokens, variables


def test_mtp_matches_numpy_restatement(mtp_setup):
    cfg, model, tokens, variables = mtp_setup
    out, inter = model.apply(variables, tokens, capture_intermediates=lambda mdl, _: isinstance(mdl, Stack) and mdl.moe)
    h = np.asarray(inter["intermediates"]["moe_layers"]["__call__"][0][0], np.float64)  # h^0, pre-norm
    p, eps = variables["params"], cfg.rms_norm_eps
    emb, head = p["embed_tokens"]["embedding"].astype(np.float64), p["lm_head"]["kernel"].astype(np.float64)
    toks = np.asarray(tokens)
    s = toks.shape[1]
    assert out.mtp_logits.shape == (2, *toks.shape, cfg.vocab_size)

    from dsjax.model.rope import rope_angles
    from dsjax.model.transformer import attention_mask

    seg = jnp.ones_like(tokens)
    cos, sin = rope_angles(cfg, segment_positions(seg))
    for k in (1, 2):
        m = p[f"mtp_{k - 1}"]
        nxt = np.zeros_like(toks)
        nxt[:, : s - k] = toks[:, k:]  # t_{i+k}
        e = np_rmsnorm(emb[nxt], m["enorm"]["scale"], eps)
        hh = np_rmsnorm(h, m["hnorm"]["scale"], eps)
        x = np.concatenate([e, hh], -1) @ m["eh_proj"]["kernel"]  # embedding first
        block_vars = {"params": m["block"], "selection_bias": variables["selection_bias"][f"mtp_{k - 1}"]["block"]}
        h, _ = Block(cfg, moe=True).apply(
            block_vars, jnp.asarray(x, jnp.float32), cos, sin, attention_mask(seg), seg > 0
        )
        h = np.asarray(h, np.float64)
        want = np_rmsnorm(h, m["shared_head_norm"]["scale"], eps) @ head
        np.testing.assert_allclose(np.asarray(out.mtp_logits[k - 1]), want, atol=1e-4, rtol=0)
    assert out.mtp_router.expert_counts.shape == (2, cfg.n_routed_experts)


def test_mtp_depth_changes_with_future_tokens_only(mtp_setup):
    """Depth-k logits at position i may depend on tokens up to i+k, never beyond."""
    cfg, model, tokens, variables = mtp_setup
    base = model.apply(variables, tokens)
    i = 4
    changed = tokens.at[:, i + 3].set((tokens[:, i + 3] + 1) % cfg.vocab_size)  # beyond depth 2's reach
    out = model.apply(variables, changed)
    np.testing.assert_allclose(
        np.asarray(out.mtp_logits[:, :, : i + 1]), np.asarray(base.mtp_logits[:, :, : i + 1]), atol=1e-6
    )
    np.testing.assert_allclose(np.asarray(out.logits[:, : i + 3]), np.asarray(base.logits[:, : i + 3]), atol=1e-6)
    changed = tokens.at[:, i + 2].set((tokens[:, i + 2] + 1) % cfg.vocab_size)  # t_{i+2}: seen by depth 2
    out = model.apply(variables, changed)
    assert np.abs(np.asarray(out.mtp_logits[1, :, i]) - np.asarray(base.mtp_logits[1, :, i])).max() > 1e-4
    np.testing.assert_allclose(np.asarray(out.mtp_logits[0, :, i]), np.asarray(base.mtp_logits[0, :, i]), atol=1e-6)


# ---------------------------------------------------------------------------------------------


def test_compile_size_does_not_grow_with_depth():
    def hlo_lines(layers, scan=True):
        cfg = load_config(TINY, [f"model.num_hidden_layers={layers}", f"model.scan_layers={scan}"]).model
        model = Transformer(cfg)
        tokens = jnp.zeros((1, 8), jnp.int32)
        variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
        return jax.jit(model.apply).lower(variables, tokens).as_text().count("\n")

    assert hlo_lines(12) == hlo_lines(3)
    assert hlo_lines(12, scan=False) > 2 * hlo_lines(3, scan=False)  # what scan saves us from


def test_variables_carry_logical_axes_and_bias_collection():
    cfg = load_config(TINY).model
    variables = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    assert set(variables) == {"params", "selection_bias"}
    w = variables["params"]["moe_layers"]["layers"]["mlp"]["w_gate"]
    assert w.names == ("layers", "experts", "embed", "expert_mlp")
    assert variables["selection_bias"]["moe_layers"]["layers"]["mlp"]["e_score_correction_bias"].shape == (
        cfg.num_moe_layers,
        cfg.n_routed_experts,
    )
