"""Hugging Face ``config.json`` <-> ``ModelConfig`` (DeepseekV2 / DeepseekV3 / DeepseekV32 / DeepseekV4).

Our field names are HF's, so most fields map one to one; what differs is read here: the hub's
``rope_scaling`` and transformers-5's ``rope_parameters`` spellings of YaRN, the V2 defaults
(softmax scoring, greedy top-k), ``num_mtp_layers``, and the FP8 release's ``quantization_config``.
V3.2 (``model_type: deepseek_v32``) is V3 plus the DSA indexer: ``index_topk``, ``index_n_heads`` and
``index_head_dim`` are required there, transformers-5's ``mlp_layer_types`` must say what
``first_k_dense_replace`` says, and other model types keep ``index_topk = 0`` (no indexer) whatever
index keys they carry.

DeepSeek-V4 (``model_type: deepseek_v4``) is read in both spellings a user meets: the release's own
config.json (DeepSeek-V4-Flash: ``compress_ratios``, ``num_hash_layers``, ``qk_rope_head_dim``, a flat YaRN
``rope_scaling`` for the compressed layers, ``compress_rope_theta``) and transformers' DeepseekV4Config as
``save_pretrained`` writes it (``layer_types``, ``mlp_layer_types``, ``compress_rates``, nested
``rope_parameters`` {main, compress}, ``partial_rotary_factor``). It is written in the release's spelling
plus the transformers keys, so that both read it back.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from dsjax.config import ConfigError, ModelConfig
from dsjax.model.hybrid_attention import CSA, HCA, SLIDING

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
# DeepSeek-V4's own fields: V2 / V3 configs neither carry nor get them.
V4_FIELDS = (
    "architecture",
    "head_dim",
    "layer_types",
    "compress_rate_csa",
    "compress_rate_hca",
    "compress_rope_theta",
    "sliding_window",
    "o_groups",
    "o_lora_rank",
    "hc_mult",
    "hc_sinkhorn_iters",
    "hc_eps",
    "mlp_layer_types",
    "swiglu_limit",
)
V3_FIELDS = tuple(f for f in HF_FIELDS if f not in V4_FIELDS)
# The V3 fields a V4 model has no use for (MLA, dense layers, expert groups): not written, left at
# their defaults when read (DeepseekV4Config even aliases intermediate_size to moe_intermediate_size).
V4_UNUSED = (
    "intermediate_size",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "v_head_dim",
    "n_group",
    "topk_group",
    "topk_method",
    "first_k_dense_replace",
)
# V4 fields with spellings of their own (read by _v4_*), and the rest, which keep their names.
V4_SPELLED = ("architecture", "layer_types", "mlp_layer_types", "compress_rate_csa", "compress_rate_hca")
V4_SPELLED += ("qk_rope_head_dim", "rope_theta", "compress_rope_theta", "rope_scaling")
V4_SAME = tuple(f for f in HF_FIELDS if f not in V4_UNUSED + V4_SPELLED)
# transformers' DeepseekV4Config defaults where ModelConfig's (V3's) differ: what HF takes for a missing key.
V4_DEFAULTS = {
    "q_lora_rank": 1024,
    "num_experts_per_tok": 6,
    "scoring_func": "sqrtsoftplus",
    "routed_scaling_factor": 1.5,
    "max_position_embeddings": 1048576,
    "swiglu_limit": 10.0,
    "index_topk": 512,
    "num_nextn_predict_layers": 1,
    "initializer_range": 0.02,
}
# What V4 fixes (no dense layers, no expert groups, bias-corrected top-k): a config saying otherwise is not V4's.
V4_FIXED = {"first_k_dense_replace": 0, "n_group": 1, "topk_group": 1, "topk_method": "noaux_tc"}
# Sizes every hub config states: without them a config is not one model's.
REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
# The DSA indexer's sizes (V3.2): a deepseek_v32 config states them, the other model types have no indexer.
INDEX_FIELDS = ("index_topk", "index_n_heads", "index_head_dim")
MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32", "deepseek_v4")
FP8_QUANTIZATION = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}
# DeepSeek-V4's release: E8M0 (power-of-two) scales throughout; its routed experts are FP4 (top-level
# expert_dtype, as V4 ships it; transformers moves it into quantization_config).
V4_QUANTIZATION = {**FP8_QUANTIZATION, "scale_fmt": "ue8m0"}


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
            f"model_type={model_type!r}: only deepseek_v2 and deepseek_v3 configs (and V3.2's deepseek_v32, "
            "V4's deepseek_v4) are supported"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act={hf['hidden_act']!r}: DeepSeek experts are SwiGLU; only 'silu' is supported")
    if hf.get("attention_bias"):
        raise ConfigError("attention_bias=True: DeepSeek MLA has no projection biases; not supported")
    if model_type == "deepseek_v4":
        return ModelConfig.from_dict({**_from_v4(hf), **_param_dtype(hf), **overrides}, "hf config")
    v32 = model_type == "deepseek_v32"
    missing = [k for k in INDEX_FIELDS if hf.get(k) is None] if v32 else []
    if missing:  # HF would take V3.2's sizes for them (64 heads of 128), which the checkpoint's indexer lacks
        raise ConfigError(f"hf config: model_type 'deepseek_v32' needs {', '.join(missing)}")
    if v32 and not (isinstance(hf["index_topk"], int) and hf["index_topk"] > 0):
        raise ConfigError(f"hf config.index_topk={hf['index_topk']!r}: a deepseek_v32 indexer keeps > 0 keys per query")
    if hf.get("num_key_value_heads") not in (None, hf.get("num_attention_heads")):
        raise ConfigError(
            "num_key_value_heads: MLA has one latent shared by all heads; it must equal num_attention_heads"
        )
    if hf.get("rope_interleave", True) is not True:
        raise ConfigError("rope_interleave=False: DeepSeek weights use the interleaved RoPE layout")

    v3 = model_type in ("deepseek_v3", "deepseek_v32")
    # null means "use the default", except for q_lora_rank where it means "no q LoRA" (V2-Lite).
    d = {k: hf[k] for k in V3_FIELDS if k in hf and (hf[k] is not None or k == "q_lora_rank")}
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
    d.update(_param_dtype(hf))

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


def _param_dtype(hf: dict[str, Any]) -> dict[str, str]:
    """{"param_dtype": ...} from ``torch_dtype`` / ``dtype`` when it is one dsjax keeps parameters in."""
    dt = str(hf.get("torch_dtype") or hf.get("dtype")).removeprefix("torch.")
    return {"param_dtype": dt} if dt in ("float32", "bfloat16") else {}


def _from_v4(hf: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig fields of a ``deepseek_v4`` config.json, in either spelling (module docstring)."""
    if hf.get("num_key_value_heads", 1) != 1:
        raise ConfigError(
            f"hf config.num_key_value_heads={hf['num_key_value_heads']!r}: DeepSeek-V4 attention shares one K=V "
            "head; it must be 1"
        )
    for k, v in V4_FIXED.items():
        if hf.get(k, v) != v:
            raise ConfigError(f"hf config.{k}={hf[k]!r}: DeepSeek-V4 has {k}={v!r}")
    d = {**V4_DEFAULTS, **{k: hf[k] for k in V4_SAME if hf.get(k) is not None}, **V4_FIXED, "architecture": "v4"}
    n, n_mtp = d["num_hidden_layers"], d["num_nextn_predict_layers"]
    csa, hca = _v4_compress_rates(hf)
    d.update(
        compress_rate_csa=csa,
        compress_rate_hca=hca,
        layer_types=_v4_layer_types(hf, n, n_mtp, csa, hca),
        mlp_layer_types=_v4_mlp_layer_types(hf, n),
    )
    return {**d, **_v4_rope(hf, d.get("head_dim", ModelConfig.head_dim), d["max_position_embeddings"])}


def _v4_compress_rates(hf: dict[str, Any]) -> tuple[int, int]:
    """(CSA rate, HCA rate): transformers' ``compress_rates`` dict (or its top-level compress_rate_csa /
    compress_rate_hca), else HF's defaults 4 and 128 (V4-Flash's; the release's config states none)."""
    rates = {CSA: 4, HCA: 128, **(hf.get("compress_rates") or {})}
    if set(rates) != {CSA, HCA}:
        raise ConfigError(f"hf config.compress_rates={hf['compress_rates']!r}: keys are {CSA!r} and {HCA!r}")
    for key, kind in (("compress_rate_csa", CSA), ("compress_rate_hca", HCA)):
        if hf.get(key) is not None:
            rates[kind] = hf[key]
    return rates[CSA], rates[HCA]


def _v4_layer_types(hf: dict[str, Any], n: int, n_mtp: int, csa: int, hca: int) -> tuple[str, ...]:
    """``layer_types``, or the release's ``compress_ratios`` mapped by value (0 sliding window, the CSA
    rate, the HCA rate), one per layer plus one per MTP layer (0: dsjax's MTP block is sliding-window);
    neither: HF's default (2 HCA layers, then CSA / HCA alternating)."""
    types, ratios = hf.get("layer_types"), hf.get("compress_ratios")
    if ratios is None:
        return tuple(types or [HCA] * min(n, 2) + [CSA if i % 2 else HCA for i in range(max(n - 2, 0))])
    by_ratio = {0: SLIDING, csa: CSA, hca: HCA}
    if csa == hca:
        raise ConfigError(f"hf config.compress_ratios: CSA and HCA share the rate {csa}, so a ratio names neither")
    if not isinstance(ratios, list) or len(ratios) not in (n, n + n_mtp):
        raise ConfigError(
            f"hf config.compress_ratios={ratios!r}: one ratio per layer ({n}), then one per MTP layer ({n_mtp})"
        )
    if bad := sorted({r for r in ratios if r not in by_ratio}, key=str):
        raise ConfigError(
            f"hf config.compress_ratios: {bad} are neither 0 (sliding window) nor the CSA rate {csa} nor the "
            f"HCA rate {hca}"
        )
    if any(ratios[n:]):
        raise ConfigError(
            f"hf config.compress_ratios: the MTP layers' {ratios[n:]} must be 0; dsjax's MTP block has "
            "sliding-window attention only"
        )
    from_ratios = tuple(by_ratio[r] for r in ratios[:n])
    if types is not None and tuple(types) != from_ratios:
        raise ConfigError(f"hf config: layer_types={types!r} disagrees with compress_ratios={ratios!r}")
    return from_ratios


def _v4_mlp_layer_types(hf: dict[str, Any], n: int) -> tuple[str, ...]:
    """``mlp_layer_types``, or the release's ``num_hash_layers`` hash-routed layers first (HF's default 3)."""
    types, k = hf.get("mlp_layer_types"), hf.get("num_hash_layers")
    if k is not None and not (isinstance(k, int) and k >= 0):
        raise ConfigError(f"hf config.num_hash_layers={k!r}: must be an integer >= 0")
    hashed = 3 if k is None else k  # transformers' default_num_hash_layers
    prefix = ("hash_moe",) * min(hashed, n) + ("moe",) * max(n - hashed, 0)
    if types is None:
        return prefix
    if k is not None and tuple(types) != prefix:
        raise ConfigError(f"hf config: mlp_layer_types={types!r} disagrees with num_hash_layers={k}")
    return tuple(types)


def _v4_rope(hf: dict[str, Any], head_dim: int, max_positions: int) -> dict[str, Any]:
    """qk_rope_head_dim, rope_theta (sliding-window layers, plain RoPE), compress_rope_theta and rope_scaling
    (compressed layers: YaRN, or none) from the release's flat ``rope_scaling`` (the compressed layers' alone,
    as the release's inference code applies it) or transformers' nested ``rope_parameters`` {main, compress}.

    The YaRN factor is the one written: transformers' ``_compute_yarn_parameters`` replaces it by
    max_position_embeddings / original_max_position_embeddings only when it is missing (it warns if the two
    disagree, and keeps the explicit one), and the release's ``precompute_freqs_cis`` takes ``rope_factor`` as
    is. Both leave cos / sin unscaled on V4 (HF forces attention_factor 1.0, the release never applies YaRN's
    mscale), as does dsjax's V4 model; so a YaRN that transformers would scale is rejected.
    """
    rp = hf.get("rope_parameters") or {}
    nested = isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict)
    main, compress = (rp["main"], rp["compress"]) if nested else ({}, dict(rp or hf.get("rope_scaling") or {}))
    # partial RoPE on the last qk_rope_head_dim channels; HF: int(head_dim * partial_rotary_factor), 64 / 512 default
    dims = {int(head_dim * f) for f in (hf.get("partial_rotary_factor"), main.get("partial_rotary_factor"),
                                        compress.get("partial_rotary_factor")) if f is not None}  # fmt: skip
    dims |= {hf["qk_rope_head_dim"]} if hf.get("qk_rope_head_dim") is not None else set()
    if len(dims) > 1:
        raise ConfigError(f"hf config: qk_rope_head_dim and partial_rotary_factor disagree ({sorted(dims)} channels)")
    out = {
        "qk_rope_head_dim": dims.pop() if dims else head_dim // 8,
        "rope_theta": main.get("rope_theta", hf.get("rope_theta", ModelConfig.rope_theta)),
        # HF's flat spelling: the compressed layers' RoPE base is compress_rope_theta, whatever the dict says
        "compress_rope_theta": (compress if nested else {}).get(
            "rope_theta", hf.get("compress_rope_theta", ModelConfig.compress_rope_theta)
        ),
        "rope_scaling": None,
    }
    if main.get("rope_type", main.get("type", "default")) != "default":
        raise ConfigError("hf config.rope_parameters.main: DeepSeek-V4's sliding-window layers use plain RoPE only")
    rtype = compress.get("rope_type", compress.get("type", "default"))
    if rtype == "default":
        return out
    if rtype != "yarn":
        raise ConfigError(f"rope_scaling type {rtype!r}: only 'yarn' (or none) is supported")
    if compress.get("attention_factor", None if nested else 1.0) != 1.0:
        raise ConfigError(
            "hf config.rope_parameters.compress: YaRN with attention_factor other than 1.0 (transformers derives "
            "one when it is missing) scales cos / sin, which DeepSeek-V4 does not"
        )
    orig = compress.get("original_max_position_embeddings", max_positions)
    out["rope_scaling"] = {  # mscale / mscale_all_dim: RopeScaling's defaults, which V4 never reads
        "factor": compress.get("factor") or max_positions / orig,
        "original_max_position_embeddings": orig,
        "beta_fast": compress.get("beta_fast") or 32.0,
        "beta_slow": compress.get("beta_slow") or 1.0,
    }
    return out


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


def to_hf_config(cfg: ModelConfig, fp8: bool = False) -> dict[str, Any]:
    """The HF ``config.json`` dict (hub spelling: ``rope_theta`` + ``rope_scaling``); a config with the DSA indexer
    (``index_topk > 0``) is a V3.2 one, with its index fields; a V4 one is ``_to_v4``'s. ``fp8`` (or
    ``cfg.fp8_weights``): the checkpoint is an FP8 release, with its ``quantization_config``."""
    if cfg.is_v4:
        return _to_v4(cfg, fp8 or cfg.fp8_weights)
    d = {f: getattr(cfg, f) for f in V3_FIELDS}
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
    if fp8 or cfg.fp8_weights:  # the FP8 release's block-scaled e4m3 weights (dsjax.hf.checkpoint writes them)
        d["quantization_config"] = dict(FP8_QUANTIZATION)
        if cfg.fp8_scale_fmt == "ue8m0":
            d["quantization_config"]["scale_fmt"] = "ue8m0"
    return d


def _to_v4(cfg: ModelConfig, fp8: bool) -> dict[str, Any]:
    """A ``deepseek_v4`` config.json: the release's spelling (``compress_ratios`` with the MTP layers' 0s,
    ``num_hash_layers`` when the hash-routed layers come first, ``qk_rope_head_dim``, the compressed layers'
    flat YaRN ``rope_scaling``; ``quantization_config`` and ``expert_dtype: fp4`` for an FP8 release) plus
    transformers' keys, which it reads first (``layer_types``, ``mlp_layer_types``, ``compress_rates``,
    ``partial_rotary_factor``): its compress_ratios reader knows the rates 4 and 128 only."""
    rate = {SLIDING: 0, CSA: cfg.compress_rate_csa, HCA: cfg.compress_rate_hca}
    n, k = cfg.num_hidden_layers, cfg.mlp_layer_types.count("hash_moe")
    rs = cfg.rope_scaling
    d = {f: getattr(cfg, f) for f in V4_SAME}
    d.update(
        model_type="deepseek_v4",
        architectures=["DeepseekV4ForCausalLM"],
        torch_dtype=cfg.param_dtype,
        num_key_value_heads=1,
        attention_bias=False,
        topk_method="noaux_tc",
        compress_ratios=[rate[t] for t in cfg.layer_types] + [0] * cfg.num_nextn_predict_layers,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        rope_theta=cfg.rope_theta,
        compress_rope_theta=cfg.compress_rope_theta,
        rope_scaling=rs
        and {
            "type": "yarn",
            "factor": rs.factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings,
            "beta_fast": rs.beta_fast,
            "beta_slow": rs.beta_slow,
        },
        layer_types=list(cfg.layer_types),
        mlp_layer_types=list(cfg.mlp_layer_types),
        compress_rates={CSA: cfg.compress_rate_csa, HCA: cfg.compress_rate_hca},
        partial_rotary_factor=cfg.qk_rope_head_dim / cfg.head_dim,
    )
    if cfg.mlp_layer_types == ("hash_moe",) * k + ("moe",) * (n - k):
        d["num_hash_layers"] = k
    if fp8:
        d.update(quantization_config=dict(V4_QUANTIZATION), expert_dtype="fp4")
    return d
