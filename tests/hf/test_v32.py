"""DeepSeek-V3.2 (DSA) through dsjax.hf: ``deepseek_v32`` configs read and written, the indexer's hub tensors
(import -> export -> import bitwise, FP8 layout, MTP), and parity with HF transformers' DeepseekV32ForCausalLM on the
v32_* fixtures (tools/make_hf_reference.py): logits, greedy decoding, and a mutation that must break both."""

import copy
import json
import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from dsjax.config import ConfigError, load_config
from dsjax.hf import from_hf_config, load_hf, save_hf, to_fp8_weights, to_hf_config
from dsjax.hf.safetensors import read_tensors
from dsjax.model import Transformer, abstract_variables
from tests.hf.test_checkpoint import assert_same_variables, nonzero_variables
from tests.hf.test_config import V3_HUB, hf_json

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
V32_FIXTURES = sorted(p.name for p in FIXTURES.glob("v32_*") if (p / "reference.npz").is_file())
TINY = ROOT / "configs" / "tiny.yaml"
TOL = 1e-4  # fp32 logits vs HF, every position
INDEX = ("index_topk", "index_n_heads", "index_head_dim")
INDEXER_TENSORS = ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight")

# deepseek-ai/DeepSeek-V3.2-Exp's config.json: V3's (same sizes, FP8 with UE8M0 scales, 1 MTP layer) plus the indexer.
V32_HUB = {
    **{k: v for k, v in V3_HUB.items() if k not in ("architectures", "model_type", "pretraining_tp")},
    "architectures": ["DeepseekV32ForCausalLM"],
    "model_type": "deepseek_v32",
    "index_topk": 2048,
    "index_n_heads": 64,
    "index_head_dim": 128,
    "quantization_config": {**V3_HUB["quantization_config"], "scale_fmt": "ue8m0"},
}


def test_v32_fixtures_present():
    assert V32_FIXTURES == ["v32_dense2", "v32_yarn_groups"], "run tools/make_hf_reference.py"


# ---------------------------------------------------------------------------------------------
# config.json


@pytest.mark.parametrize("name", V32_FIXTURES)
def test_fixture_config(name):
    hf = hf_json(name)
    cfg = from_hf_config(FIXTURES / name)
    assert hf["model_type"] == "deepseek_v32" and "rope_interleave" not in hf and "scoring_func" not in hf
    assert {k: getattr(cfg, k) for k in INDEX} == {k: hf[k] for k in INDEX}
    assert 0 < cfg.index_topk < np.load(FIXTURES / name / "reference.npz")["input_ids"].shape[1]
    assert (cfg.scoring_func, cfg.topk_method, cfg.num_nextn_predict_layers) == ("sigmoid", "noaux_tc", 0)
    assert hf["mlp_layer_types"] == ["dense"] * cfg.first_k_dense_replace + ["sparse"] * cfg.num_moe_layers
    assert cfg.num_moe_layers > 0 and cfg.first_k_dense_replace > 0


@pytest.mark.parametrize("name", V32_FIXTURES)
def test_config_round_trip(name):
    cfg = from_hf_config(FIXTURES / name)
    hf = json.loads(json.dumps(to_hf_config(cfg)))
    assert hf["model_type"] == "deepseek_v32" and hf["architectures"] == ["DeepseekV32ForCausalLM"]
    assert {k: hf[k] for k in INDEX} == {k: getattr(cfg, k) for k in INDEX}
    assert "rope_interleave" not in hf  # V3.2's config has no such key: MLA's RoPE is always interleaved
    assert from_hf_config(hf) == cfg


def test_official_hub_config():
    cfg = from_hf_config(copy.deepcopy(V32_HUB))
    v3 = from_hf_config(copy.deepcopy(V3_HUB))
    assert (cfg.index_topk, cfg.index_n_heads, cfg.index_head_dim) == (2048, 64, 128)
    assert cfg.num_nextn_predict_layers == 1 and cfg.param_dtype == "bfloat16"
    assert cfg == v3.replace(index_topk=2048, index_n_heads=64, index_head_dim=128)
    hf = to_hf_config(cfg)
    assert {k: hf[k] for k in ("model_type", *INDEX)} == {k: V32_HUB[k] for k in ("model_type", *INDEX)}


def test_v2_v3_configs_have_no_indexer():
    """Index keys in a deepseek_v3 / v2 file do not make an indexer (only deepseek_v32 has one), and the export of
    a config without one writes no index keys."""
    index = {"index_topk": 8, "index_n_heads": 4, "index_head_dim": 16}
    for name in ("v3_qlora_groups", "v2_group_limited"):
        cfg = from_hf_config({**hf_json(name), **index})
        assert cfg.index_topk == 0 and cfg == from_hf_config(FIXTURES / name)
        hf = to_hf_config(cfg)
        assert not set(INDEX) & set(hf) and hf["model_type"] == hf_json(name)["model_type"]


def test_mlp_layer_types():
    hf = hf_json("v32_dense2")  # 3 layers, first_k_dense_replace 2
    cfg = from_hf_config(hf)
    no_k = {k: v for k, v in hf.items() if k != "first_k_dense_replace"}
    assert from_hf_config(no_k) == cfg  # the leading "dense" layers say it
    assert from_hf_config({k: v for k, v in hf.items() if k != "mlp_layer_types"}) == cfg
    assert from_hf_config({**hf, "mlp_layer_types": None}) == cfg


V32_REJECTS = {
    **{f"no_{k}": ({k: None}, f"model_type 'deepseek_v32' needs {k}") for k in INDEX},
    "index_topk_0": ({"index_topk": 0}, "index_topk=0: a deepseek_v32 indexer keeps > 0 keys per query"),
    "no_q_lora": ({"q_lora_rank": None}, "the indexer reads the query LoRA latent; set q_lora_rank"),
    "odd_index_head_dim": ({"index_head_dim": 13}, "index_head_dim=13: must be even"),
    "mlp_layer_types_moe_first": ({"mlp_layer_types": ["sparse", "dense", "dense"]}, "mlp_layer_types=['sparse'"),
    "mlp_layer_types_vs_first_k": (
        {"mlp_layer_types": ["dense", "sparse", "sparse"]},
        "dsjax needs first_k_dense_replace=2 'dense' layers, then 'sparse' (MoE) ones, for num_hidden_layers=3",
    ),
    "mlp_layer_types_length": ({"mlp_layer_types": ["dense", "dense"]}, "mlp_layer_types=['dense', 'dense']"),
    "mlp_layer_types_kind": ({"mlp_layer_types": ["dense", "dense", "moe"]}, "mlp_layer_types"),
    "rope_interleave": ({"rope_interleave": False}, "rope_interleave=False"),
}


@pytest.mark.parametrize(("changes", "message"), V32_REJECTS.values(), ids=V32_REJECTS.keys())
def test_v32_config_rejects(changes, message):
    hf = {**hf_json("v32_dense2"), **changes}
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_hf_config(hf)


# ---------------------------------------------------------------------------------------------
# Checkpoints: the indexer's tensors.


@pytest.mark.parametrize("name", V32_FIXTURES)
def test_import_export_import_is_bitwise(tmp_path, name):
    cfg, variables = load_hf(FIXTURES / name)
    original = load_file(FIXTURES / name / "model.safetensors")
    indexer = {n for n in original if ".self_attn.indexer." in n}
    assert indexer == {f"model.layers.{i}.self_attn.indexer.{t}" for i in range(3) for t in INDEXER_TENSORS}
    # Our layout: kernels [*in, *out] with the index heads split out, LayerNorm scale and bias.
    moe = variables["params"]["moe_layers"]["layers"]["self_attn"]["indexer"]
    i = cfg.first_k_dense_replace  # hub layer of MoE layer 0
    hub = lambda t: original[f"model.layers.{i}.self_attn.indexer.{t}"]  # noqa: E731
    n, d = cfg.index_n_heads, cfg.index_head_dim
    np.testing.assert_array_equal(moe["wq_b"]["kernel"][0], hub("wq_b.weight").T.reshape(cfg.q_lora_rank, n, d))
    np.testing.assert_array_equal(moe["wk"]["kernel"][0], hub("wk.weight").T)
    np.testing.assert_array_equal(moe["k_norm"]["scale"][0], hub("k_norm.weight"))
    np.testing.assert_array_equal(moe["k_norm"]["bias"][0], hub("k_norm.bias"))
    np.testing.assert_array_equal(moe["weights_proj"]["kernel"][0], hub("weights_proj.weight").T)

    save_hf(tmp_path / "out", cfg, variables, max_shard_bytes=100_000)
    cfg2, variables2 = load_hf(tmp_path / "out")
    assert cfg2 == cfg
    assert_same_variables(variables, variables2)
    exported = read_tensors(tmp_path / "out")
    assert sorted(exported) == sorted(original)
    for k, a in original.items():
        assert exported[k].dtype == a.dtype and np.array_equal(exported[k], a), k


def v32_tiny(*overrides: str):
    return load_config(
        TINY,
        ["model.index_topk=4", "model.index_n_heads=2", "model.index_head_dim=16", *overrides],
    ).model


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
def test_every_variable_round_trips_with_mtp(tmp_path, scan):
    """configs/tiny.yaml with an indexer and MTP: the table covers every variable (the MTP block's indexer too)."""
    cfg = v32_tiny(f"model.scan_layers={str(scan).lower()}")
    assert cfg.num_nextn_predict_layers >= 1
    variables = nonzero_variables(cfg)
    save_hf(tmp_path / "ckpt", cfg, variables)
    names = set(load_file(tmp_path / "ckpt" / "model.safetensors"))
    layers = range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers)
    assert {f"model.layers.{i}.self_attn.indexer.{t}" for i in layers for t in INDEXER_TENSORS} <= names
    loaded_cfg, loaded = load_hf(tmp_path / "ckpt", scan_layers=scan)
    assert loaded_cfg == cfg
    assert_same_variables(variables, loaded)


def test_fp8_indexer_tensors(tmp_path):
    """FP8 (the V3.2 release's layout): wq_b and wk are e4m3 with 128x128 block scales, weights_proj and k_norm
    stay in the param dtype; the export writes them so and loads back to the same variables."""
    cfg, v = to_fp8_weights(*load_hf(FIXTURES / "v32_yarn_groups"))
    indexer = v["params"]["moe_layers"]["layers"]["self_attn"]["indexer"]
    assert indexer["wq_b"]["kernel"].dtype == indexer["wk"]["kernel"].dtype == ml_dtypes.float8_e4m3fn
    assert indexer["wq_b"]["kernel_scale_inv"].shape == indexer["wk"]["kernel_scale_inv"].shape == (2, 1, 1)
    model = nn.meta.unbox(abstract_variables(cfg))  # what the FP8 model's Indexer declares
    assert jax.tree.structure(model) == jax.tree.structure(v)
    assert all(a.dtype == b.dtype for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(v)))
    assert indexer["weights_proj"]["kernel"].dtype == indexer["k_norm"]["bias"].dtype == np.float32
    assert "kernel_scale_inv" not in indexer["weights_proj"]
    save_hf(tmp_path / "fp8", cfg, v)
    sd = read_tensors(tmp_path / "fp8")
    p = "model.layers.1.self_attn.indexer."
    assert sd[p + "wq_b.weight"].dtype == sd[p + "wk.weight"].dtype == ml_dtypes.float8_e4m3fn
    assert {p + "wq_b.weight_scale_inv", p + "wk.weight_scale_inv"} <= set(sd)
    assert sd[p + "weights_proj.weight"].dtype == np.float32 and p + "weights_proj.weight_scale_inv" not in sd
    assert json.loads((tmp_path / "fp8" / "config.json").read_text())["model_type"] == "deepseek_v32"
    cfg2, v2 = load_hf(tmp_path / "fp8", fp8_weights=True)
    assert cfg2 == cfg
    assert_same_variables(v2, v)


# ---------------------------------------------------------------------------------------------
# Parity with HF transformers' DeepseekV32ForCausalLM: logits and greedy tokens are checked for every
# fixture by tests/model/test_transformer.py and tests/infer/test_generate.py; here, that they can fail.


def logits_of(cfg, variables, tokens):
    return np.asarray(jax.jit(Transformer(cfg).apply)(variables, jnp.asarray(tokens)).logits)


@pytest.mark.parametrize("name", V32_FIXTURES)
def test_mutations_break_parity(name):
    """The parity tests can fail: the indexer's k_norm bias zeroed, or the indexer's selection turned off
    (index_topk = the sequence length: dense MLA), moves the logits far beyond the tolerance -- but only from
    query index_topk on, where the selection drops keys."""
    cfg, variables = load_hf(FIXTURES / name)
    ref = np.load(FIXTURES / name / "reference.npz")
    k = cfg.index_topk
    for stack in ("dense_layers", "moe_layers"):
        variables["params"][stack]["layers"]["self_attn"]["indexer"]["k_norm"]["bias"][:] = 0
    err = np.abs(logits_of(cfg, variables, ref["input_ids"]) - ref["logits"])
    assert err.max() > 100 * TOL, err.max()
    assert err[:, :k].max() <= TOL  # the first k queries see at most k keys: all kept whatever the scores
    _, variables = load_hf(FIXTURES / name)
    seq = ref["input_ids"].shape[1]
    dense = np.abs(logits_of(cfg.replace(index_topk=seq), variables, ref["input_ids"]) - ref["logits"])
    assert dense.max() > 100 * TOL and dense[:, :k].max() <= TOL, dense.max()
