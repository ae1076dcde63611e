"""Hugging Face ``config.json`` <-> ``ModelConfig`` (DeepseekV2 / DeepseekV3 / DeepseekV32).

Our field names are HF's, so most fields map one to one; what differs is read here: the hub's
``rope_scaling`` and transformers-5's ``rope_parameters`` spellings of YaRN, the V2 defaults
(softmax scoring, greedy top-k), ``num_mtp_layers``, and the FP8 release's ``quantization_config``.
V3.2 (``model_type: deepseek_v32``) is V3 plus the DSA indexer: ``index_topk``, ``index_n_heads`` and
``index_head_dim`` are required there, transformers-5's ``mlp_layer_types`` must say what
``first_k_dense_replace`` says, and other model types keep ``index_topk = 0`` (no indexer) whatever
index keys they carry.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from dsjax.config import ConfigError, ModelConfig

# Fields that are dsjax's own: HF configs do not carry them.
OURS = (
    "dtype",
    "param_dtype",
    "scan_layers",
    "moe_impl",
    "remat",
    "sequence_parallel",
    "attention_impl",
    "fp8",
    "fp8_impl",
    "fp8_scale_fmt",
    "fp8_weights",
    "indexer_warmup",
    "expert_dispatch",
    "expert_capacity_factor",
)
# Fields that HF configs carry under the same name (rope_scaling's spellings are read below).
HF_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name not in OURS)
# Sizes every hub config states: without them a config is not one model's.
REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
# The DSA indexer's sizes (V3.2): a deepseek_v32 config states them, the other model types have no indexer.
INDEX_FIELDS = ("index_topk", "index_n_heads", "index_head_dim")
MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32")
FP8_QUANTIZATION = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}


def from_hf_config(src: str | os.PathLike | dict[str, Any], **overrides) -> ModelConfig:
    """An HF DeepseekV2/V3 ``config.json`` (a file, its directory, or the dict) as a ModelConfig;
    ``overrides`` set ModelConfig fields (e.g. ``param_dtype="bfloat16"``)."""
    if not isinstance(src, dict):
        p = os.fspath(src)
        with open(os.path.join(p, "config.json") if os.path.isdir(p) else p) as f:
            src = json.load(f)
    hf = dict(src)
    missing = [k for k in REQUIRED if k not in hf]
    if missing:  # HF would take V3's sizes for them, which the checkpoint's tensors do not have
        raise ConfigError(f"hf config: missing {', '.join(missing)}")
    model_type = hf.get("model_type", "deepseek_v3")
    if model_type not in MODEL_TYPES:
        raise ConfigError(
            f"model_type={model_type!r}: only deepseek_v2 and deepseek_v3 configs (and V3.2's deepseek_v32) "
            "are supported"
        )
    v32 = model_type == "deepseek_v32"
    missing = [k for k in INDEX_FIELDS if hf.get(k) is None] if v32 else []
    if missing:  # HF would take V3.2's sizes for them (64 heads of 128), which the checkpoint's indexer lacks
        raise ConfigError(f"hf config: model_type 'deepseek_v32' needs {', '.join(missing)}")
    if v32 and not (isinstance(hf["index_topk"], int) and hf["index_topk"] > 0):
        raise ConfigError(f"hf config.index_topk={hf['index_topk']!r}: a deepseek_v32 indexer keeps > 0 keys per query")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act={hf['hidden_act']!r}: DeepSeek experts are SwiGLU; only 'silu' is supported")
    if hf.get("attention_bias"):
        raise ConfigError("attention_bias=True: DeepSeek MLA has no projection biases; not supported")
    if hf.get("num_key_value_heads") not in (None, hf.get("num_attention_heads")):
        raise ConfigError(
            "num_key_value_heads: MLA has one latent shared by all heads; it must equal num_attention_heads"
        )
    if hf.get("rope_interleave", True) is not True:
        raise ConfigError("rope_interleave=False: DeepSeek weights use the interleaved RoPE layout")

    v3 = model_type in ("deepseek_v3", "deepseek_v32")
    # null means "use the default", except for q_lora_rank where it means "no q LoRA" (V2-Lite).
    d = {k: hf[k] for k in HF_FIELDS if k in hf and (hf[k] is not None or k == "q_lora_rank")}
    if not v32:  # V2 / V3 have no indexer, whatever index keys the file carries
        for k in INDEX_FIELDS:
            d.pop(k, None)
    if hf.get("mlp_layer_types") is not None:
        _check_mlp_layer_types(hf["mlp_layer_types"], d)
    d.setdefault("scoring_func", hf.get("scoring_func") or ("sigmoid" if v3 else "softmax"))
    d.setdefault("topk_method", "noaux_tc" if v3 else "greedy")
    if "num_mtp_layers" in hf and "num_nextn_predict_layers" not in hf:
        d["num_nextn_predict_layers"] = hf["num_mtp_layers"]
    d.setdefault("num_nextn_predict_layers", 0)
    if d["topk_method"] == "greedy":  # no group limit, whatever n_group says
        d["n_group"], d["topk_group"] = 1, 1
    if hf.get("torch_dtype") or hf.get("dtype"):
        dt = str(hf.get("torch_dtype") or hf.get("dtype")).removeprefix("torch.")
        if dt in ("float32", "bfloat16"):
            d["param_dtype"] = dt

    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if "rope_theta" in rope:
        d["rope_theta"] = rope["rope_theta"]
    rtype = rope.get("rope_type", rope.get("type", "default"))
    if rtype == "yarn":
        orig = rope.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
        factor = rope.get("factor") or hf["max_position_embeddings"] / orig
        d["rope_scaling"] = {
            "factor": factor,
            "original_max_position_embeddings": orig,
            "beta_fast": rope.get("beta_fast", 32.0),
            "beta_slow": rope.get("beta_slow", 1.0),
            "mscale": rope.get("mscale", 1.0),
            "mscale_all_dim": rope.get("mscale_all_dim", 0.0),
        }
    elif rtype != "default":
        raise ConfigError(f"rope_scaling type {rtype!r}: only 'yarn' (or none) is supported")
    d.update(overrides)
    return ModelConfig.from_dict(d, "hf config")


def _check_mlp_layer_types(types: Any, d: dict[str, Any]) -> None:
    """transformers-5's per-layer MLP kinds (V3.2): first_k_dense_replace "dense" layers, then "sparse" (MoE) ones,
    the only pattern DeepSeek models (and dsjax's two layer stacks) have. Without first_k_dense_replace in the file,
    the number of leading "dense" layers sets it."""
    n = d.get("num_hidden_layers")
    if not isinstance(types, list) or not isinstance(n, int):
        raise ConfigError(f"hf config.mlp_layer_types={types!r}: must be a list of 'dense' / 'sparse', one per layer")
    if "first_k_dense_replace" not in d:
        d["first_k_dense_replace"] = next((i for i, t in enumerate(types) if t != "dense"), len(types))
    k = d["first_k_dense_replace"]
    want = ["dense"] * min(k, n) + ["sparse"] * max(n - k, 0) if isinstance(k, int) else None
    if types != want:
        raise ConfigError(
            f"hf config.mlp_layer_types={types!r}: dsjax needs first_k_dense_replace={k!r} 'dense' layers, then "
            f"'sparse' (MoE) ones, for num_hidden_layers={n}"
        )


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The HF ``config.json`` dict (hub spelling: ``rope_theta`` + ``rope_scaling``); a config with the DSA indexer
    (``index_topk > 0``) is a V3.2 one, with its index fields."""
    d = {f: getattr(cfg, f) for f in HF_FIELDS}
    d["rope_scaling"] = dataclasses.asdict(cfg.rope_scaling) if cfg.rope_scaling else None
    v3 = cfg.scoring_func == "sigmoid"
    d.update(
        model_type="deepseek_v3" if v3 else "deepseek_v2",
        architectures=["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
        torch_dtype=cfg.param_dtype,
        num_key_value_heads=cfg.num_attention_heads,
        rope_interleave=True,
        attention_bias=False,
    )
    if cfg.index_topk:  # V3.2: MLA's RoPE is always interleaved there, and the file has no rope_interleave key
        d.update(model_type="deepseek_v32", architectures=["DeepseekV32ForCausalLM"])
        del d["rope_interleave"]
    else:
        for k in INDEX_FIELDS:
            del d[k]
    if cfg.fp8_weights:  # the FP8 release's block-scaled e4m3 weights (dsjax.hf.checkpoint writes them)
        d["quantization_config"] = dict(FP8_QUANTIZATION)
        if cfg.fp8_scale_fmt == "ue8m0":
            d["quantization_config"]["scale_fmt"] = "ue8m0"
    return d
