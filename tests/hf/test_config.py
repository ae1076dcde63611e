"""dsjax.hf.config: HF ``config.json`` <-> ModelConfig (transformers-5 fixtures, hub spelling,
official hub configs, rejected settings, round trips)."""

import copy
import dataclasses
import json
import re
from pathlib import Path

import pytest

from dsjax.config import ConfigError, ModelConfig, load_config
from dsjax.hf.config import from_hf_config, to_hf_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
FIXTURES = sorted(p for p in (ROOT / "tests" / "fixtures").iterdir() if (p / "config.json").is_file())
V3_FIXTURES = [p for p in FIXTURES if not p.name.startswith("v4_")]  # V4's own: tests/hf/test_v4.py
OURS = (
    "dtype",
    "param_dtype",
    "scan_layers",
    "moe_impl",
    "remat",
    "attention_impl",
    "fp8",
    "fp8_impl",
    "fp8_scale_fmt",
    "fp8_weights",
    "expert_dispatch",
    "expert_capacity_factor",
)  # not in HF configs


def hf_json(name: str) -> dict:
    return json.loads((ROOT / "tests" / "fixtures" / name / "config.json").read_text())


def same_but_ours(a: ModelConfig, b: ModelConfig, also: tuple[str, ...] = ()) -> bool:
    """a == b in every field except dsjax's own (and ``also``)."""
    return dataclasses.replace(a, **{f: getattr(b, f) for f in OURS + also}) == b


# ---------------------------------------------------------------------------------------------
# Hugging Face config.json (transformers-5 fixtures, hub spelling, official hub configs).


@pytest.mark.parametrize("fixture", V3_FIXTURES, ids=lambda p: p.name)
def test_fixture_loads(fixture):
    hf = json.loads((fixture / "config.json").read_text())
    cfg = from_hf_config(fixture)
    assert from_hf_config(fixture / "config.json") == cfg
    assert from_hf_config(str(fixture)) == cfg
    assert from_hf_config(hf) == cfg
    # Every HF field that the fixture sets comes through unchanged.
    same = [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "moe_intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "q_lora_rank",
        "kv_lora_rank",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "v_head_dim",
        "max_position_embeddings",
        "n_routed_experts",
        "n_shared_experts",
        "num_experts_per_tok",
        "n_group",
        "topk_group",
        "norm_topk_prob",
        "routed_scaling_factor",
        "first_k_dense_replace",
        "rms_norm_eps",
        "initializer_range",
        "tie_word_embeddings",
    ]
    assert {k: getattr(cfg, k) for k in same} == {k: hf[k] for k in same}
    v3 = hf["model_type"] in ("deepseek_v3", "deepseek_v32")
    assert cfg.scoring_func == ("sigmoid" if v3 else "softmax")
    assert cfg.topk_method == hf.get("topk_method", "noaux_tc")
    assert cfg.num_nextn_predict_layers == hf.get("num_nextn_predict_layers", 0)
    assert cfg.param_dtype == hf["dtype"]
    rp = hf["rope_parameters"]
    assert cfg.rope_theta == rp["rope_theta"]
    if rp["rope_type"] == "default":
        assert cfg.rope_scaling is None
    else:
        rs = cfg.rope_scaling
        assert rs.type == "yarn"
        for k in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
            assert getattr(rs, k) == rp[k], k


@pytest.mark.parametrize("name", ["v3_no_qlora", "v2_lite_style"])
def test_null_q_lora_rank_stays_none(name):
    assert hf_json(name)["q_lora_rank"] is None
    assert from_hf_config(ROOT / "tests" / "fixtures" / name).q_lora_rank is None


def to_hub_spelling(hf: dict) -> dict:
    """transformers-5 ``rope_parameters`` -> the hub's top-level ``rope_theta`` + ``rope_scaling``."""
    hf = copy.deepcopy(hf)
    rp = hf.pop("rope_parameters")
    hf["rope_theta"] = rp.pop("rope_theta")
    rtype = rp.pop("rope_type")
    hf["rope_scaling"] = None if rtype == "default" else {"type": rtype, **rp}
    return hf


@pytest.mark.parametrize("fixture", V3_FIXTURES, ids=lambda p: p.name)
def test_hub_spelling_equals_rope_parameters(fixture):
    hf = json.loads((fixture / "config.json").read_text())
    hub = to_hub_spelling(hf)
    assert "rope_parameters" not in hub and "rope_theta" in hub
    assert from_hf_config(hub) == from_hf_config(hf)


FP8 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}

V3_HUB = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
    "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1,
    "first_k_dense_replace": 3, "norm_topk_prob": True, "scoring_func": "sigmoid",
    "num_nextn_predict_layers": 1, "max_position_embeddings": 163840, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu",
    "attention_bias": False, "attention_dropout": 0.0, "aux_loss_alpha": 0.001, "seq_aux": True, "ep_size": 1,
    "initializer_range": 0.02, "bos_token_id": 0, "eos_token_id": 1, "use_cache": True,
    "pretraining_tp": 1, "transformers_version": "4.33.1", "quantization_config": FP8,
}  # fmt: skip

V2_LITE_HUB = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
    "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
    "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
    "n_shared_experts": 2, "n_routed_experts": 64, "routed_scaling_factor": 1.0,
    "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
    "topk_method": "greedy", "n_group": 1, "topk_group": 1, "num_experts_per_tok": 6, "moe_layer_freq": 1,
    "first_k_dense_replace": 1, "norm_topk_prob": False, "scoring_func": "softmax",
    "max_position_embeddings": 163840, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu",
    "attention_bias": False, "attention_dropout": 0.0, "aux_loss_alpha": 0.001, "seq_aux": True, "ep_size": 1,
    "initializer_range": 0.02, "bos_token_id": 100000, "eos_token_id": 100001, "use_cache": True,
}  # fmt: skip


@pytest.mark.parametrize(
    ("hub", "yaml_name"),
    [(V3_HUB, "deepseek_v3_671b.yaml"), (V2_LITE_HUB, "deepseek_v2_lite.yaml")],
    ids=["v3_671b", "v2_lite"],
)
def test_official_hub_config_matches_yaml(hub, yaml_name):
    from_hub = from_hf_config(copy.deepcopy(hub))
    from_yaml = load_config(ROOT / "configs" / yaml_name).model
    assert from_hub.param_dtype == "bfloat16"  # from torch_dtype
    assert same_but_ours(from_hub, from_yaml, also=("initializer_range",)), {
        f.name: (getattr(from_hub, f.name), getattr(from_yaml, f.name))
        for f in dataclasses.fields(ModelConfig)
        if getattr(from_hub, f.name) != getattr(from_yaml, f.name)
    }


HF_REJECTS = {
    "model_type": ({"model_type": "llama"}, "model_type='llama': only deepseek_v2 and deepseek_v3"),
    "hidden_act": ({"hidden_act": "gelu"}, "hidden_act='gelu': DeepSeek experts are SwiGLU; only 'silu'"),
    "attention_bias": ({"attention_bias": True}, "attention_bias=True: DeepSeek MLA has no projection biases"),
    "num_key_value_heads": (
        {"num_key_value_heads": 1}, "num_key_value_heads: MLA has one latent shared by all heads; it must equal"),
    "rope_interleave": ({"rope_interleave": False}, "rope_interleave=False"),
    "rope_parameters_linear": (
        {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
        "rope_scaling type 'linear': only 'yarn' (or none) is supported"),
    "hub_rope_scaling_linear": (
        {"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0}},
        "rope_scaling type 'linear': only 'yarn' (or none) is supported"),
    "bad_value": ({"n_group": 3}, "n_routed_experts=8: must be divisible by n_group=3"),
    "bad_type": ({"hidden_size": "64"}, "hf config.hidden_size='64': must be an integer"),
}  # fmt: skip


@pytest.mark.parametrize(("changes", "message"), HF_REJECTS.values(), ids=HF_REJECTS.keys())
def test_from_hf_rejects(changes, message):
    hf = {**hf_json("v3_qlora_groups"), **changes}
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_hf_config(hf)


def test_from_hf_overrides():
    path = ROOT / "tests" / "fixtures" / "v3_qlora_groups"
    cfg = from_hf_config(path, dtype="bfloat16", moe_impl="blocked", num_hidden_layers=2)
    assert cfg == from_hf_config(path).replace(dtype="bfloat16", moe_impl="blocked", num_hidden_layers=2)
    message = "hf config.hiden_size: unknown key; did you mean 'hidden_size'?"
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_hf_config(path, hiden_size=64)


def test_from_hf_greedy_ignores_n_group():
    # HF's greedy routing does not look at groups, so n_group/topk_group from the json are dropped.
    cfg = from_hf_config({**hf_json("v2_lite_style"), "n_group": 4, "topk_group": 2})
    assert (cfg.topk_method, cfg.n_group, cfg.topk_group) == ("greedy", 1, 1)


def test_from_hf_defaults_and_aliases():
    hf = hf_json("v3_qlora_groups")
    del hf["num_nextn_predict_layers"]
    assert from_hf_config(hf).num_nextn_predict_layers == 0
    assert from_hf_config({**hf, "num_mtp_layers": 2}).num_nextn_predict_layers == 2
    v2 = {k: v for k, v in hf_json("v2_lite_style").items() if k != "topk_method"}
    assert from_hf_config(v2).topk_method == "greedy"
    assert from_hf_config({**hf, "torch_dtype": "torch.bfloat16"}).param_dtype == "bfloat16"


# ---------------------------------------------------------------------------------------------
# to_hf round trip.


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_to_hf_round_trips(path):
    cfg = load_config(path).model
    hf = json.loads(json.dumps(to_hf_config(cfg)))  # plain JSON
    if cfg.is_v4:
        assert hf["model_type"] == "deepseek_v4" and len(hf["compress_ratios"]) == cfg.num_hidden_layers + 1
    else:
        assert "rope_parameters" not in hf and isinstance(hf["rope_theta"], float)
        v3 = "deepseek_v32" if cfg.index_topk else "deepseek_v3"
        assert hf["model_type"] == (v3 if cfg.scoring_func == "sigmoid" else "deepseek_v2")
    back = from_hf_config(hf)
    assert back.param_dtype == cfg.param_dtype
    assert same_but_ours(back, cfg)
    ours = cfg.replace(dtype="bfloat16", scan_layers=False, moe_impl="blocked")
    assert same_but_ours(from_hf_config(to_hf_config(ours)), ours)


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.name)
def test_to_hf_round_trips_fixtures(fixture):
    cfg = from_hf_config(fixture)
    assert from_hf_config(to_hf_config(cfg)) == cfg
