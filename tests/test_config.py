"""dsjax.config: validation rules, YAML loading + overrides."""

import copy
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from dsjax.config import ConfigError, ModelConfig, RopeScaling, apply_overrides, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
YARN = {"factor": 4.0, "original_max_position_embeddings": 128}


def base(**changes) -> dict:
    """The ``model:`` section of configs/tiny.yaml (8 experts in 2 groups, top-1 group, top-2), changed."""
    d = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["model"]
    d.update(changes)
    return d


def write_yaml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_base_is_valid():
    cfg = ModelConfig.from_dict(base())
    assert (cfg.n_routed_experts, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok) == (8, 2, 1, 2)


# ---------------------------------------------------------------------------------------------
# _validate: one rule per case; the message names the field (and its value) and states the rule.

POSITIVE = [
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "max_position_embeddings", "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group",
]  # fmt: skip


@pytest.mark.parametrize("value", [0, -1])
@pytest.mark.parametrize("field", POSITIVE)
def test_sizes_must_be_positive(field, value):
    with pytest.raises(ConfigError, match=re.escape(f"{field}={value}: must be a positive integer")):
        ModelConfig.from_dict(base(**{field: value}))


VALIDATE_CASES = {
    "n_group_not_dividing_experts": (
        {"n_group": 3}, "n_routed_experts=8: must be divisible by n_group=3"),
    "topk_group_gt_n_group": (
        {"topk_group": 3}, "topk_group=3: cannot exceed n_group=2"),
    "top_k_gt_kept_experts": (
        {"num_experts_per_tok": 5},
        "num_experts_per_tok=5: the 1 kept group(s) of 4 expert(s) hold only 4 experts to choose from"),
    "odd_rope_dim": (
        {"qk_rope_head_dim": 15}, "qk_rope_head_dim=15: RoPE rotates pairs of channels, so it must be even"),
    "first_k_dense_gt_layers": (
        {"first_k_dense_replace": 5}, "first_k_dense_replace=5: must be between 0 and num_hidden_layers=4"),
    "first_k_dense_negative": (
        {"first_k_dense_replace": -1}, "first_k_dense_replace=-1: must be between 0 and num_hidden_layers=4"),
    "q_lora_rank_zero": ({"q_lora_rank": 0}, "q_lora_rank=0: must be positive, or null"),
    "n_shared_negative": ({"n_shared_experts": -1}, "n_shared_experts=-1: must be >= 0"),
    "mtp_negative": ({"num_nextn_predict_layers": -1}, "num_nextn_predict_layers=-1: must be >= 0"),
    "rms_norm_eps_zero": ({"rms_norm_eps": 0.0}, "rms_norm_eps=0.0: must be > 0"),
    "initializer_range_zero": ({"initializer_range": 0.0}, "initializer_range=0.0: must be > 0"),
    "rope_theta_one": ({"rope_theta": 1.0}, "rope_theta=1.0: must be > 1"),
    "routed_scaling_zero": ({"routed_scaling_factor": 0.0}, "routed_scaling_factor=0.0: must be > 0"),
    "greedy_with_groups": (
        {"topk_method": "greedy"}, "topk_method='greedy': 'greedy' does not limit groups but n_group=2"),
    "noaux_tc_one_expert_per_group": (  # 8 groups of 1; topk_group=2 keeps the top-k rule satisfied
        {"n_group": 8, "topk_group": 2},
        "topk_method='noaux_tc': 'noaux_tc' scores a group by its top-2 experts, but each group holds 1"),
    "fp8_scale_fmt_without_fp8": (
        {"fp8_scale_fmt": "ue8m0"}, "fp8_scale_fmt='ue8m0': sets the scales of FP8 GEMMs; without fp8 or fp8_weights"),
    "fp8_training_and_fp8_weights": (
        {"fp8": True, "fp8_weights": True}, "fp8_weights=True: stores e4m3 weights for inference, while fp8=True"),
    "rope_factor_lt_1": (
        {"rope_scaling": {**YARN, "factor": 0.5}}, "rope_scaling.factor=0.5: must be >= 1"),
    "rope_orig_max_pos_zero": (
        {"rope_scaling": {**YARN, "original_max_position_embeddings": 0}},
        "rope_scaling.original_max_position_embeddings: must be a positive integer"),
    "rope_beta_fast_eq_slow": (
        {"rope_scaling": {**YARN, "beta_fast": 1, "beta_slow": 1}},
        "rope_scaling.beta_fast=1.0: must exceed beta_slow=1.0"),
    "rope_beta_fast_lt_slow": (
        {"rope_scaling": {**YARN, "beta_fast": 1, "beta_slow": 32}},
        "rope_scaling.beta_fast=1.0: must exceed beta_slow=32.0"),
}  # fmt: skip


@pytest.mark.parametrize(("changes", "message"), VALIDATE_CASES.values(), ids=VALIDATE_CASES.keys())
def test_validation_rule(changes, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        ModelConfig.from_dict(base(**changes))


@pytest.mark.parametrize("beta_slow", [0, -1])
def test_rope_beta_slow_must_be_positive(beta_slow):
    # YaRN's correction range divides by beta_slow (dsjax/rope.py:_correction_dim): 0 is a
    # ZeroDivisionError and a negative value a math domain error when the model is built, so the
    # config must reject it up front.
    with pytest.raises(ConfigError, match=r"rope_scaling\.beta_slow"):
        ModelConfig.from_dict(base(rope_scaling={**YARN, "beta_slow": beta_slow}))


def test_validation_runs_on_replace():
    cfg = ModelConfig.from_dict(base())
    with pytest.raises(ConfigError, match="must be divisible by n_group=3"):
        cfg.replace(n_group=3)


# ---------------------------------------------------------------------------------------------
# _coerce / _build: types, Literal values, unknown keys.

COERCE_CASES = {
    "str_for_int": ({"hidden_size": "64"}, "model.hidden_size='64': must be an integer"),
    "float_for_int": ({"hidden_size": 2.5}, "model.hidden_size=2.5: must be an integer"),
    "bool_for_int": ({"hidden_size": True}, "model.hidden_size=True: must be an integer"),
    "str_for_optional_int": ({"q_lora_rank": "none"}, "model.q_lora_rank='none': must be an integer"),
    "int_for_bool": ({"norm_topk_prob": 1}, "model.norm_topk_prob=1: must be true or false"),
    "str_for_bool": ({"scan_layers": "yes"}, "model.scan_layers='yes': must be true or false"),
    "str_for_float": ({"routed_scaling_factor": "2.5"}, "model.routed_scaling_factor='2.5': must be a number"),
    "bool_for_float": ({"rms_norm_eps": True}, "model.rms_norm_eps=True: must be a number"),
    "scoring_func": (
        {"scoring_func": "softplus"}, "model.scoring_func='softplus': must be one of 'sigmoid', 'softmax'"),
    "dtype": ({"dtype": "float16"}, "model.dtype='float16': must be one of 'float32', 'bfloat16'"),
    "param_dtype": ({"param_dtype": "fp32"}, "model.param_dtype='fp32': must be one of 'float32', 'bfloat16'"),
    "moe_impl": (
        {"moe_impl": "dense"}, "model.moe_impl='dense': must be one of 'auto', 'ragged_dot', 'blocked'"),
    "topk_method": (
        {"topk_method": "topk"},
        "model.topk_method='topk': must be one of 'noaux_tc', 'group_limited_greedy', 'greedy'"),
    "hidden_act": ({"hidden_act": "gelu"}, "model.hidden_act='gelu': must be one of 'silu'"),
    "rope_not_mapping": (
        {"rope_scaling": "yarn"}, "model.rope_scaling: expected a mapping of RopeScaling fields, got str"),
    "rope_type": (
        {"rope_scaling": {**YARN, "type": "linear"}}, "model.rope_scaling.type='linear': must be one of 'yarn'"),
    "rope_factor_type": (
        {"rope_scaling": {**YARN, "factor": "4"}}, "model.rope_scaling.factor='4': must be a number"),
    "rope_unknown_key": (
        {"rope_scaling": {**YARN, "facter": 2}}, "model.rope_scaling.facter: unknown key; did you mean 'factor'?"),
    "unknown_key_close": ({"hiden_size": 64}, "model.hiden_size: unknown key; did you mean 'hidden_size'?"),
}  # fmt: skip


@pytest.mark.parametrize(("changes", "message"), COERCE_CASES.values(), ids=COERCE_CASES.keys())
def test_type_rule(changes, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        ModelConfig.from_dict(base(**changes))


def test_rope_scaling_missing_required_field():
    with pytest.raises(ConfigError, match=r"model\.rope_scaling: .*original_max_position_embeddings"):
        ModelConfig.from_dict(base(rope_scaling={"factor": 4.0}))


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"model\.zzzz: unknown key; valid keys: ") as e:
        ModelConfig.from_dict(base(zzzz=1))
    listed = str(e.value).split("valid keys: ")[1].split(", ")
    assert listed == sorted(f.name for f in dataclasses.fields(ModelConfig))


def test_whole_numbers_coerce():
    cfg = ModelConfig.from_dict(base(num_hidden_layers=4.0, rope_theta=500, rms_norm_eps=1))
    assert cfg.num_hidden_layers == 4 and type(cfg.num_hidden_layers) is int
    assert cfg.rope_theta == 500.0 and type(cfg.rope_theta) is float
    assert type(cfg.rms_norm_eps) is float


def test_direct_construction_is_checked():
    with pytest.raises(ConfigError, match=re.escape("hidden_size='64': must be an integer")):
        ModelConfig(hidden_size="64")
    with pytest.raises(ConfigError, match=re.escape("dtype='float16': must be one of")):
        ModelConfig(dtype="float16")
    with pytest.raises(ConfigError, match="must be divisible by n_group=3"):
        ModelConfig(n_group=3)
    cfg = ModelConfig(num_hidden_layers=4.0, rope_scaling=dict(YARN))  # coerced, like YAML
    assert type(cfg.num_hidden_layers) is int
    assert cfg.rope_scaling == RopeScaling(**YARN)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"factor": "4"}, "rope_scaling.factor='4'"),
        ({"type": "linear"}, "rope_scaling.type='linear'"),
        ({"original_max_position_embeddings": 128.5}, "rope_scaling.original_max_position_embeddings=128.5"),
    ],
    ids=["str_factor", "linear_type", "float_orig_max_pos"],
)
def test_direct_construction_checks_nested_rope_scaling(change, message):
    # Same checks as the dict/YAML route (test_type_rule rope_* cases), when built directly.
    with pytest.raises(ConfigError, match=re.escape(message)):
        ModelConfig(rope_scaling=RopeScaling(**{**YARN, **change}))


# ---------------------------------------------------------------------------------------------
# YAML loading and key=value overrides.


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_yaml_config_loads(path):
    cfg = load_config(path).model
    assert isinstance(cfg, ModelConfig)
    assert cfg == ModelConfig.from_dict(yaml.safe_load(path.read_text())["model"])


def test_loaded_config_is_frozen():
    cfg = load_config(ROOT / "configs" / "tiny.yaml").model
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 256
    v3 = load_config(ROOT / "configs" / "deepseek_v3_671b.yaml").model
    with pytest.raises(dataclasses.FrozenInstanceError):
        v3.rope_scaling.factor = 8.0
    assert hash(v3) == hash(load_config(ROOT / "configs" / "deepseek_v3_671b.yaml").model)


def test_overrides_parse_as_yaml():
    path = ROOT / "configs" / "deepseek_v3_671b.yaml"
    plain = load_config(path).model
    cfg = load_config(
        path,
        [
            "model.q_lora_rank=null",
            "model.rope_scaling.factor=8",
            "model.dtype=bfloat16",
            "model.num_hidden_layers=5",
            "model.scan_layers=false",
            "model.norm_topk_prob=true",
        ],
    ).model
    assert cfg.q_lora_rank is None
    assert cfg.rope_scaling == dataclasses.replace(plain.rope_scaling, factor=8.0)
    assert cfg.dtype == "bfloat16"
    assert cfg.num_hidden_layers == 5 and cfg.scan_layers is False
    assert cfg == plain.replace(q_lora_rank=None, rope_scaling=cfg.rope_scaling, num_hidden_layers=5, scan_layers=False)


def test_override_adds_a_nested_section():
    override = "model.rope_scaling={factor: 4, original_max_position_embeddings: 128}"
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [override]).model
    assert cfg.rope_scaling == RopeScaling(**YARN)


def test_override_scientific_notation_float():
    # ``1e-5`` is how everyone writes an epsilon; PyYAML's YAML 1.1 resolver reads it (without a
    # '.') as the string '1e-5', and the config then says "must be a number".
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["model.rms_norm_eps=1e-5"]).model
    assert cfg.rms_norm_eps == 1e-5


def test_apply_overrides_returns_a_copy():
    d = {"model": base()}
    snapshot = copy.deepcopy(d)
    out = apply_overrides(d, ["model.hidden_size=256", "model.rope_scaling.factor=2"])
    assert d == snapshot
    assert out["model"]["hidden_size"] == 256 and out["model"]["rope_scaling"] == {"factor": 2}


OVERRIDE_ERRORS = {
    "no_equals": ("model.hidden_size", "override 'model.hidden_size': expected key=value"),
    "through_a_scalar": ("model.hidden_size.x=1", "override 'model.hidden_size.x=1': 'hidden_size' is not a section"),
    "invalid_value": ("model.n_group=3", "n_routed_experts=8: must be divisible by n_group=3"),
    "wrong_type": ("model.hidden_size=abc", "model.hidden_size='abc': must be an integer"),
    "unknown_key": ("model.hiden_size=64", "model.hiden_size: unknown key; did you mean 'hidden_size'?"),
    "unknown_section": ("modle.hidden_size=64", "unknown section 'modle'; did you mean 'model'?"),
    "train_fp8_weights": (
        "model.fp8_weights=true", "model.fp8_weights=True: e4m3 weights are for inference and cannot be trained"),
}  # fmt: skip


@pytest.mark.parametrize(("override", "message"), OVERRIDE_ERRORS.values(), ids=OVERRIDE_ERRORS.keys())
def test_bad_override(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(ROOT / "configs" / "tiny.yaml", [override])


def test_unknown_section_close_match(tmp_path):
    text = "modle:\n  hidden_size: 64\n"
    with pytest.raises(ConfigError, match=re.escape("unknown section 'modle'; did you mean 'model'?")):
        load_config(write_yaml(tmp_path, text))


def test_unknown_section_no_close_match(tmp_path):
    text = yaml.safe_dump({"model": base(), "optimizer": {"lr": 1e-3}})
    with pytest.raises(
        ConfigError,
        match=re.escape("unknown section 'optimizer'; valid keys: data, grpo, mesh, model, sft, task, train"),
    ):
        load_config(write_yaml(tmp_path, text))


@pytest.mark.parametrize("text", ["", "# nothing\n"], ids=["empty", "comment_only"])
def test_missing_model_section(tmp_path, text):
    with pytest.raises(ConfigError, match=re.escape("missing the 'model:' section")):
        load_config(write_yaml(tmp_path, text))


def test_model_section_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("model: expected a mapping of ModelConfig fields, got list")):
        load_config(write_yaml(tmp_path, "model: [1, 2]\n"))
