"""DeepSeek-V4 hub checkpoints in the release's own names and formats (dsjax.hf): config.json in the
release's and transformers' spellings, bitwise round trips through the unquantized export (scanned and
unrolled layer runs, MTP, hash and learned routing), the FP8 release format (e4m3 linears and packed FP4
experts with E8M0 scales) against an independent numpy statement of both formats, and the fixtures."""

import copy
import json
import re
import warnings
from pathlib import Path

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dsjax.config import ConfigError, ModelConfig, load_config
from dsjax.hf import CheckpointError, from_hf_config, load_hf, save_hf, to_hf_config
from dsjax.hf.checkpoint import dequantize_fp4, quantize_fp4
from dsjax.hf.safetensors import read_tensors
from dsjax.model.transformer import abstract_variables
from tests.hf.test_checkpoint import assert_same_variables, nonzero_variables

ROOT = Path(__file__).resolve().parents[2]
V4_FIXTURES = sorted(p for p in (ROOT / "tests" / "fixtures").glob("v4_*") if (p / "model.safetensors").is_file())
SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"

# DeepSeek-V4-Flash's config.json as released (plus the top-level expert_dtype later revisions ship).
V4_FLASH = {
    "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "attention_bias": False,
    "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 1, "hc_eps": 1e-06, "hc_mult": 4,
    "hc_sinkhorn_iters": 20, "head_dim": 512, "hidden_act": "silu", "hidden_size": 4096, "index_head_dim": 128,
    "index_n_heads": 64, "index_topk": 512, "initializer_range": 0.02, "max_position_embeddings": 1048576,
    "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 64, "num_experts_per_tok": 6, "num_hidden_layers": 43, "num_hash_layers": 3,
    "num_key_value_heads": 1, "num_nextn_predict_layers": 1, "o_groups": 8, "o_lora_rank": 1024,
    "q_lora_rank": 1024, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 16, "original_max_position_embeddings": 65536,
                     "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.5, "scoring_func": "sqrtsoftplus", "sliding_window": 128,
    "swiglu_limit": 10.0, "tie_word_embeddings": False, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.57.1", "use_cache": True, "vocab_size": 129280, "compress_rope_theta": 160000,
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0],
    "expert_dtype": "fp4",
}  # fmt: skip


def tiny(**overrides) -> ModelConfig:
    """7 layers whose runs exercise the scan: 1 sliding, 2 x CSA (hash routed), 2 x (HCA, CSA); MTP 1.
    hidden 160: the FP8 blocks of a [32, 160] weight are 1 x 2, the second ragged; 5 FP4 blocks per row."""
    kw = dict(
        architecture="v4", vocab_size=64, hidden_size=160, num_attention_heads=4, head_dim=32, qk_rope_head_dim=8,
        q_lora_rank=32, o_groups=2, o_lora_rank=16, moe_intermediate_size=32, n_routed_experts=4,
        num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=0, num_hidden_layers=7,
        layer_types=(SLIDING, CSA, CSA, HCA, CSA, HCA, CSA), mlp_layer_types=("hash_moe",) * 3 + ("moe",) * 4,
        compress_rate_csa=4, compress_rate_hca=8, sliding_window=6, hc_mult=2, index_topk=2, index_n_heads=4,
        index_head_dim=16, scoring_func="sqrtsoftplus", routed_scaling_factor=1.5, swiglu_limit=10.0,
        num_nextn_predict_layers=1, rope_scaling=dict(factor=4.0, original_max_position_embeddings=16),
    )  # fmt: skip
    return ModelConfig.from_dict({**kw, **overrides})


def assert_fits_model(cfg: ModelConfig, variables: dict):
    """Loaded variables have the model's tree, shapes and dtypes (abstract_variables)."""
    want = nn.meta.unbox(abstract_variables(cfg))
    assert jax.tree.structure(variables) == jax.tree.structure(want)
    for (path, a), w in zip(jax.tree_util.tree_leaves_with_path(variables), jax.tree.leaves(want)):
        assert (a.shape, a.dtype) == (w.shape, w.dtype), jax.tree_util.keystr(path)


def release_names(cfg: ModelConfig) -> set[str]:
    """The release's tensor names (unquantized), restated from DeepSeek-V4-Flash's safetensors index."""

    def block(p: str, layer_type: str, hashed: bool) -> list[str]:
        names = [f"{p}{n}.weight" for n in ("attn_norm", "ffn_norm")]
        names += [f"{p}hc_{a}_{b}" for a in ("attn", "ffn") for b in ("fn", "base", "scale")]
        names += [f"{p}attn.{n}.weight" for n in ("wq_a", "q_norm", "wq_b", "wkv", "kv_norm", "wo_a", "wo_b")]
        names += [f"{p}attn.attn_sink"]
        compressor = ["wkv.weight", "wgate.weight", "ape", "norm.weight"]
        if layer_type != SLIDING:
            names += [f"{p}attn.compressor.{n}" for n in compressor]
        if layer_type == CSA:
            names += [f"{p}attn.indexer.{n}.weight" for n in ("wq_b", "weights_proj")]
            names += [f"{p}attn.indexer.compressor.{n}" for n in compressor]
        names += [f"{p}ffn.gate.weight", f"{p}ffn.gate.{'tid2eid' if hashed else 'bias'}"]
        names += [f"{p}ffn.shared_experts.{w}.weight" for w in ("w1", "w2", "w3")]
        names += [f"{p}ffn.experts.{j}.{w}.weight" for j in range(cfg.n_routed_experts) for w in ("w1", "w2", "w3")]
        return names

    names = ["embed.weight", "head.weight", "norm.weight", "hc_head_fn", "hc_head_base", "hc_head_scale"]
    for i, (t, m) in enumerate(zip(cfg.layer_types, cfg.mlp_layer_types)):
        names += block(f"layers.{i}.", t, m == "hash_moe")
    for d in range(cfg.num_nextn_predict_layers):
        p = f"mtp.{d}."
        names += [f"{p}{n}.weight" for n in ("enorm", "hnorm", "e_proj", "h_proj", "norm")]
        names += [f"{p}hc_head_{b}" for b in ("fn", "base", "scale")]
        names += block(p, SLIDING, False)
    return set(names)


def read_dir(path: Path) -> dict:
    """A checkpoint directory's tensors (safetensors' numpy reader knows no E8M0, so dsjax's)."""
    return {n: np.array(a) for n, a in read_tensors(path).items()}


# ---------------------------------------------------------------------------------------------
# The unquantized export: names, layouts, bitwise round trips.


@pytest.mark.parametrize(("scan", "dtype"), [(True, "float32"), (False, "bfloat16")], ids=["scan", "unrolled_bf16"])
def test_round_trip_is_bitwise_in_release_names(tmp_path, scan, dtype):
    cfg = tiny(scan_layers=scan, param_dtype=dtype)
    if scan:  # the runs: (sliding, hash); (CSA, hash) x 2 scanned; ((HCA, moe), (CSA, moe)) x 2 scanned
        from dsjax.model.v4_block import layer_plan

        assert [(len(r.kinds), r.repeats) for r in layer_plan(cfg)] == [(1, 1), (1, 2), (2, 2)]
    variables = nonzero_variables(cfg)
    save_hf(tmp_path, cfg, variables, overwrite=True, max_shard_bytes=200_000)
    assert len(list(tmp_path.glob("*.safetensors"))) > 1  # sharded, with an index
    sd = read_dir(tmp_path)
    assert set(sd) == release_names(cfg)
    for name in ("layers.1.attn.indexer.compressor.ape", "layers.0.ffn.gate.tid2eid", "mtp.0.e_proj.weight"):
        assert name in sd
    assert "hc_head_fn" in sd and "layers.0.attn.compressor.ape" not in sd and "layers.3.ffn.gate.bias" in sd
    assert sd["layers.0.ffn.gate.tid2eid"].dtype == np.int64 and sd["layers.2.attn.wq_a.weight"].dtype == dtype
    cfg2, variables2 = load_hf(tmp_path, scan_layers=scan)  # scan_layers is dsjax's own: not in config.json
    assert cfg2 == cfg
    assert_fits_model(cfg, variables2)
    assert_same_variables(variables, variables2)


def test_export_layouts(tmp_path):
    """Each hub tensor against our leaf, indexed by hand: linears [out, in], wo_a row g * o_lora_rank + r,
    the router and experts per expert, mHC and ape as they are, the MTP module's own names."""
    cfg = tiny(scan_layers=False)
    variables = nonzero_variables(cfg)
    save_hf(tmp_path, cfg, variables)
    sd, p, b = read_dir(tmp_path), variables["params"], variables["selection_bias"]
    layer = p["layers"]["layer_1"]["block_0"]  # CSA, hash-routed
    np.testing.assert_array_equal(sd["embed.weight"], p["embed_tokens"]["embedding"])
    np.testing.assert_array_equal(sd["head.weight"], p["lm_head"]["kernel"].T)
    np.testing.assert_array_equal(sd["hc_head_fn"], p["hc_head"]["fn"])
    np.testing.assert_array_equal(sd["layers.1.hc_ffn_fn"], layer["hc_ffn"]["fn"])
    np.testing.assert_array_equal(sd["layers.1.attn.wq_a.weight"], layer["attn"]["wq_a"]["kernel"].T)
    wq_b = layer["attn"]["wq_b"]["kernel"]  # [q_lora, heads, head_dim]
    np.testing.assert_array_equal(sd["layers.1.attn.wq_b.weight"][2 * 32 + 5], wq_b[:, 2, 5])
    wo_a, hub = layer["attn"]["wo_a"], sd["layers.1.attn.wo_a.weight"]  # ours [g, in, r]
    assert hub.shape == (2 * 16, 4 * 32 // 2)
    for g, i, r in [(0, 0, 0), (1, 3, 7), (1, 63, 15), (0, 10, 9)]:
        assert hub[g * 16 + r, i] == wo_a[g, i, r]
    np.testing.assert_array_equal(
        sd["layers.1.attn.indexer.compressor.ape"], layer["attn"]["indexer"]["compressor"]["ape"]
    )
    assert sd["layers.1.attn.compressor.ape"].shape == (4, 64)  # CSA's overlapping compressor: 2 x head_dim
    assert sd["layers.3.attn.compressor.ape"].shape == (8, 32)  # HCA's
    np.testing.assert_array_equal(sd["layers.1.ffn.gate.weight"], layer["ffn"]["gate"].T)
    np.testing.assert_array_equal(sd["layers.1.ffn.experts.3.w1.weight"], layer["ffn"]["w_gate"][3].T)
    np.testing.assert_array_equal(sd["layers.1.ffn.experts.3.w3.weight"], layer["ffn"]["w_up"][3].T)
    np.testing.assert_array_equal(sd["layers.1.ffn.experts.2.w2.weight"], layer["ffn"]["w_down"][2].T)
    shared = layer["ffn"]["shared_experts"]
    np.testing.assert_array_equal(sd["layers.1.ffn.shared_experts.w2.weight"], shared["down_proj"]["kernel"].T)
    tid2eid = b["layers"]["layer_1"]["block_0"]["ffn"]["tid2eid"]
    np.testing.assert_array_equal(sd["layers.1.ffn.gate.tid2eid"], tid2eid)
    bias = b["layers"]["layer_3"]["block_0"]["ffn"]["e_score_correction_bias"]
    np.testing.assert_array_equal(sd["layers.3.ffn.gate.bias"], bias)
    mtp = p["mtp_0"]
    np.testing.assert_array_equal(sd["mtp.0.e_proj.weight"], mtp["e_proj"]["kernel"].T)
    np.testing.assert_array_equal(sd["mtp.0.hc_head_base"], mtp["hc_head"]["base"])
    np.testing.assert_array_equal(sd["mtp.0.attn.wkv.weight"], mtp["block"]["attn"]["wkv"]["kernel"].T)
    np.testing.assert_array_equal(sd["mtp.0.ffn.gate.bias"], b["mtp_0"]["block"]["ffn"]["e_score_correction_bias"])


# ---------------------------------------------------------------------------------------------
# The FP8 release format, stated independently: e4m3 in 128 x 128 blocks, packed e2m1 in 1 x 32 blocks,
# each with a power-of-two (E8M0) scale 2^ceil(log2(amax / max)), max 448 (e4m3) or 6 (e2m1).

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])  # e2m1 magnitudes by code (OCP MX: 1 sign, 2 exponent, 1 mantissa bit)
QUANTIZED_FP8 = re.compile(
    r"(attn\.(wq_a|wq_b|wkv|wo_a|wo_b|indexer\.wq_b)|ffn\.shared_experts\.w[123]|mtp\.\d+\.[eh]_proj)\.weight$"
)
QUANTIZED_FP4 = re.compile(r"ffn\.experts\.\d+\.w[123]\.weight$")


def pow2_at_least(x):
    return (2.0 ** np.ceil(np.log2(np.float64(x)))).astype(np.float32)


def e8m0_value(scale: np.ndarray) -> np.ndarray:
    """An E8M0 byte b stands for 2^(b - 127)."""
    return 2.0 ** (scale.view(np.uint8).astype(np.float64) - 127)


def fp8_reference(w: np.ndarray) -> np.ndarray:
    out = np.empty_like(w)
    for i in range(0, w.shape[0], 128):
        for j in range(0, w.shape[1], 128):
            b = w[i : i + 128, j : j + 128]
            s = pow2_at_least(np.float32(max(np.abs(b).max(), 1e-4)) / np.float32(448))
            q = np.clip(b / s, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
            out[i : i + 128, j : j + 128] = q * s
    return out


def fp4_reference(w: np.ndarray) -> np.ndarray:
    """Nearest e2m1 value of w / s, ties to the even code (mantissa bit 0), per 32 consecutive inputs."""
    out = np.empty_like(w)
    for j in range(0, w.shape[1], 32):
        b = w[:, j : j + 32]
        s = pow2_at_least(np.maximum(np.abs(b).max(1, keepdims=True), 6 * 2.0**-126) / np.float32(6))
        x = np.clip(np.abs(b / s), 0, 6)
        d = np.abs(x[..., None] - E2M1)
        tied = d == d.min(-1, keepdims=True)
        code = np.argmax(tied * (2 - np.arange(8) % 2), axis=-1)  # of the nearest, the even code
        out[:, j : j + 32] = np.copysign(E2M1[code], b) * s
    return out


def fp4_decode(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Bytes -> values: element 2j in the low nibble, 2j+1 in the high; code bit 3 the sign."""
    u = packed.view(np.uint8).astype(np.int64)
    codes = np.stack([u & 0xF, u >> 4], -1).reshape(u.shape[0], -1)
    values = np.where(codes & 8, -1.0, 1.0) * E2M1[codes & 7]
    return values * np.repeat(e8m0_value(scale), 32, axis=1)[:, : values.shape[1]]


def test_e2m1_nibbles_decode_as_the_format_says():
    # bytes 0x71, 0x9F, 0x20, 0x5C: nibbles (low, high) = (1, 7), (F, 9), (0, 2), (C, 5)
    packed = np.array([[0x71, 0x9F, 0x20, 0x5C]] * 2, np.uint8).view(np.int8)
    scale = np.array([[127], [129]], np.uint8).view(ml_dtypes.float8_e8m0fnu)  # 2^0, 2^2
    row = [0.5, 6.0, -6.0, -0.5, 0.0, 1.0, -2.0, 3.0]
    np.testing.assert_array_equal(dequantize_fp4(packed, scale), [row, [4 * v for v in row]])
    # and back: amax 6 gives the scale 2^0 and the same bytes (the rest of the 32 inputs zero)
    q, s = quantize_fp4(np.pad(np.array([row], np.float32), ((0, 0), (0, 24))))
    assert s.view(np.uint8).tolist() == [[127]]
    assert q.view(np.uint8)[0, :4].tolist() == [0x71, 0x9F, 0x20, 0x5C] and not q[0, 4:].any()


def test_fp4_rounds_to_nearest_even():
    # w / s on the midpoints: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4; amax 6 -> s 1
    w = np.array([[0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.75, -5.0] + [0.0] * 22], np.float32)
    q, s = quantize_fp4(w)
    want = [0, 1, 1, 2, 2, 4, 4, 6, -1, -4] + [0] * 22
    np.testing.assert_array_equal(fp4_decode(q, s), [want])
    np.testing.assert_array_equal(fp4_reference(w), [want])


@pytest.fixture(scope="module")
def fp8_export(tmp_path_factory):
    """tiny() (unrolled) exported plainly and as the FP8 release: (cfg, variables, plain tensors, fp8 dir)."""
    cfg = tiny(scan_layers=False)
    variables = nonzero_variables(cfg, seed=1)
    plain, fp8 = tmp_path_factory.mktemp("plain"), tmp_path_factory.mktemp("fp8")
    save_hf(plain, cfg, variables, overwrite=True)
    save_hf(fp8, cfg, variables, fp8=True, overwrite=True)
    return cfg, variables, read_dir(plain), fp8


def test_fp8_export_writes_the_release_format(fp8_export):
    cfg, _, plain, path = fp8_export
    sd = read_dir(path)
    hf = json.loads((path / "config.json").read_text())
    assert hf["quantization_config"] == V4_FLASH["quantization_config"] and hf["expert_dtype"] == "fp4"
    fp8 = {n for n in plain if QUANTIZED_FP8.search(n)}
    fp4 = {n for n in plain if QUANTIZED_FP4.search(n)}
    assert {"layers.0.attn.wo_a.weight", "mtp.0.h_proj.weight"} <= fp8 and "mtp.0.ffn.experts.3.w2.weight" in fp4
    assert set(sd) == set(plain) | {n.removesuffix(".weight") + ".scale" for n in fp8 | fp4}
    for n in fp8:
        assert sd[n].dtype == ml_dtypes.float8_e4m3fn and sd[n].shape == plain[n].shape, n
    for n in fp4:
        out, n_in = plain[n].shape
        assert sd[n].dtype == np.int8 and sd[n].shape == (out, n_in // 2), n
        assert sd[n.removesuffix(".weight") + ".scale"].shape == (out, n_in // 32), n
    for n in set(plain) - fp8 - fp4:  # unquantized: as the plain export
        assert sd[n].dtype == plain[n].dtype and np.array_equal(sd[n], plain[n]), n
    scale = sd["layers.0.attn.wq_a.scale"]
    assert scale.dtype == ml_dtypes.float8_e8m0fnu and scale.shape == (1, 2)  # [32, 160]: ceil(32/128), ceil(160/128)
    w1, s1 = sd["layers.0.ffn.experts.0.w1.weight"], sd["layers.0.ffn.experts.0.w1.scale"]
    assert (w1.dtype, w1.shape, s1.dtype, s1.shape) == (np.int8, (32, 80), ml_dtypes.float8_e8m0fnu, (32, 5))
    assert sd["layers.0.ffn.gate.tid2eid"].dtype == np.int64
    assert sd["layers.1.attn.compressor.wkv.weight"].dtype == np.float32
    # The bytes, decoded as the formats say, are the originals quantized.
    for n in fp8:
        blocks = np.repeat(np.repeat(e8m0_value(sd[n.removesuffix(".weight") + ".scale"]), 128, 0), 128, 1)
        got = sd[n].astype(np.float64) * blocks[: plain[n].shape[0], : plain[n].shape[1]]
        np.testing.assert_array_equal(got, fp8_reference(plain[n]), err_msg=n)
    for n in fp4:
        np.testing.assert_array_equal(
            fp4_decode(sd[n], sd[n.removesuffix(".weight") + ".scale"]), fp4_reference(plain[n]), err_msg=n
        )


def test_fp8_export_imports_dequantized_and_round_trips_bitwise(fp8_export, tmp_path):
    cfg, _, plain, path = fp8_export
    cfg1, loaded = load_hf(path, scan_layers=False)
    assert cfg1 == cfg
    save_hf(tmp_path / "plain", cfg, loaded)
    values = read_dir(tmp_path / "plain")
    for n, a in plain.items():
        want = fp8_reference(a) if QUANTIZED_FP8.search(n) else fp4_reference(a) if QUANTIZED_FP4.search(n) else a
        np.testing.assert_array_equal(values[n], want, err_msg=n)
    save_hf(tmp_path / "again", cfg, loaded, fp8=True)
    cfg2, again = load_hf(tmp_path / "again", scan_layers=False)
    assert cfg2 == cfg
    assert_same_variables(loaded, again)


def test_fp8_release_loads_for_fp8_inference(fp8_export):
    """fp8_weights=True keeps the release's e4m3 bytes (scales as fp32) and requantizes FP4 experts to e4m3
    blocks; wo_a, which our model keeps unquantized, is dequantized."""
    _, _, plain, path = fp8_export
    sd = read_dir(path)
    cfg, variables = load_hf(path, fp8_weights=True, scan_layers=False)
    assert cfg.fp8_weights and cfg.fp8_scale_fmt == "ue8m0"
    assert_fits_model(cfg, variables)
    attn = variables["params"]["layers"]["layer_0"]["block_0"]["attn"]
    wq_a = sd["layers.0.attn.wq_a.weight"]
    np.testing.assert_array_equal(attn["wq_a"]["kernel"].view(np.uint8), wq_a.T.view(np.uint8))
    np.testing.assert_array_equal(attn["wq_a"]["kernel_scale_inv"], e8m0_value(sd["layers.0.attn.wq_a.scale"]).T)
    assert attn["wo_a"].dtype == np.float32
    np.testing.assert_array_equal(attn["wo_a"][1, :, 3], fp8_reference(plain["layers.0.attn.wo_a.weight"])[16 + 3])
    ffn = variables["params"]["layers"]["layer_0"]["block_0"]["ffn"]
    assert ffn["w_gate"].dtype == ml_dtypes.float8_e4m3fn and ffn["w_gate_scale_inv"].shape == (4, 2, 1)
    blocks = np.repeat(np.repeat(ffn["w_gate_scale_inv"][0], 128, 0), 128, 1)
    w1 = ffn["w_gate"][0].astype(np.float32) * blocks[:160, :32]
    np.testing.assert_allclose(w1, fp4_reference(plain["layers.0.ffn.experts.0.w1.weight"]).T, rtol=0.07, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# config.json: the release's spelling, transformers' spelling, round trips, what cannot be represented.


def test_v4_flash_config():
    cfg = from_hf_config(copy.deepcopy(V4_FLASH))
    assert cfg.is_v4 and cfg.param_dtype == "bfloat16"
    assert cfg.layer_types[:4] == (SLIDING, SLIDING, CSA, HCA) and cfg.layer_types[42] == CSA
    assert [cfg.layer_types.count(t) for t in (SLIDING, CSA, HCA)] == [2, 21, 20]
    assert cfg.mlp_layer_types == ("hash_moe",) * 3 + ("moe",) * 40
    assert (cfg.compress_rate_csa, cfg.compress_rate_hca, cfg.num_nextn_predict_layers) == (4, 128, 1)
    assert (cfg.rope_theta, cfg.compress_rope_theta, cfg.qk_rope_head_dim, cfg.head_dim) == (10000, 160000, 64, 512)
    rs = cfg.rope_scaling
    assert (rs.factor, rs.original_max_position_embeddings, rs.beta_fast, rs.beta_slow) == (16, 65536, 32, 1)
    assert (cfg.hc_mult, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.swiglu_limit) == (4, 20, 1e-6, 10.0)
    assert (cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk) == (64, 128, 512)
    assert (cfg.o_groups, cfg.o_lora_rank, cfg.sliding_window, cfg.q_lora_rank) == (8, 1024, 128, 1024)
    assert (cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_shared_experts) == (256, 6, 1)
    assert (cfg.scoring_func, cfg.routed_scaling_factor, cfg.n_group, cfg.topk_group) == ("sqrtsoftplus", 1.5, 1, 1)
    assert cfg.first_k_dense_replace == 0 and cfg.max_position_embeddings == 1048576
    # as transformers' _compute_yarn_parameters: a missing factor is max_position_embeddings / original
    no_factor = {k: v for k, v in V4_FLASH["rope_scaling"].items() if k != "factor"}
    assert from_hf_config({**copy.deepcopy(V4_FLASH), "rope_scaling": no_factor}) == cfg
    # Written back in the release's spelling (and read back to the same config).
    hf = json.loads(json.dumps(to_hf_config(cfg, fp8=True)))
    for k in ("compress_ratios", "num_hash_layers", "qk_rope_head_dim", "quantization_config", "expert_dtype"):
        assert hf[k] == V4_FLASH[k], k
    assert hf["rope_scaling"] == V4_FLASH["rope_scaling"]
    assert from_hf_config(hf) == cfg
    assert "quantization_config" not in to_hf_config(cfg) and "expert_dtype" not in to_hf_config(cfg)


def test_v4_flash_config_matches_yaml():
    from_hub, from_yaml = (
        from_hf_config(copy.deepcopy(V4_FLASH)),
        load_config(ROOT / "configs" / "deepseek_v4_flash.yaml"),
    )
    ours = ("dtype", "param_dtype")  # dsjax's own: how the run computes and keeps parameters
    assert from_hub.replace(**{f: getattr(from_yaml.model, f) for f in ours}) == from_yaml.model


def to_transformers_spelling(hf: dict) -> dict:
    """The release's config.json as transformers' DeepseekV4Config.save_pretrained writes it."""
    hf = copy.deepcopy(hf)
    n = hf["num_hidden_layers"]
    ratios, k = hf.pop("compress_ratios"), hf.pop("num_hash_layers")
    hf["layer_types"] = [{0: SLIDING, 4: CSA, 128: HCA}[r] for r in ratios[:n]]
    hf["mlp_layer_types"] = ["hash_moe"] * k + ["moe"] * (n - k)
    hf["compress_rates"] = {CSA: 4, HCA: 128}
    prf = hf.pop("qk_rope_head_dim") / hf["head_dim"]
    yarn = {**hf.pop("rope_scaling"), "rope_type": "yarn", "attention_factor": 1.0}
    hf["partial_rotary_factor"] = prf
    hf["rope_parameters"] = {
        "main": {"rope_type": "default", "rope_theta": hf["rope_theta"], "partial_rotary_factor": prf},
        "compress": {**yarn, "rope_theta": hf["compress_rope_theta"], "partial_rotary_factor": prf},
    }
    del hf["rope_theta"], hf["compress_rope_theta"]
    return hf


def test_transformers_spelling_reads_the_same():
    assert from_hf_config(to_transformers_spelling(V4_FLASH)) == from_hf_config(copy.deepcopy(V4_FLASH))


@pytest.mark.parametrize("fixture", V4_FIXTURES, ids=lambda p: p.name)
def test_fixture_config(fixture):
    hf = json.loads((fixture / "config.json").read_text())
    cfg = from_hf_config(fixture)
    assert cfg.layer_types == tuple(hf["layer_types"]) and cfg.mlp_layer_types == tuple(hf["mlp_layer_types"])
    assert (cfg.compress_rate_csa, cfg.compress_rate_hca) == (hf["compress_rates"][CSA], hf["compress_rates"][HCA])
    main, compress = hf["rope_parameters"]["main"], hf["rope_parameters"]["compress"]
    assert (cfg.rope_theta, cfg.compress_rope_theta) == (main["rope_theta"], compress["rope_theta"])
    assert cfg.qk_rope_head_dim == hf["qk_rope_head_dim"] == hf["head_dim"] * hf["partial_rotary_factor"]
    if compress["rope_type"] == "yarn":
        rs = cfg.rope_scaling
        assert (rs.factor, rs.original_max_position_embeddings) == (
            compress["factor"],
            compress["original_max_position_embeddings"],
        )
    else:
        assert cfg.rope_scaling is None
    for k in ("hc_mult", "hc_sinkhorn_iters", "sliding_window", "swiglu_limit", "o_groups", "index_topk"):
        assert getattr(cfg, k) == hf[k], k
    assert from_hf_config(json.loads(json.dumps(to_hf_config(cfg)))) == cfg


def test_hash_layers_anywhere_and_no_yarn():
    cfg = tiny(mlp_layer_types=("moe", "hash_moe", "moe", "hash_moe", "moe", "moe", "moe"), rope_scaling=None)
    hf = to_hf_config(cfg)
    assert "num_hash_layers" not in hf and hf["mlp_layer_types"][1] == "hash_moe" and hf["rope_scaling"] is None
    assert hf["compress_ratios"] == [0, 4, 4, 8, 4, 8, 4, 0]
    assert from_hf_config(hf) == cfg
    hash_first = ("hash_moe",) * 3 + ("moe",) * 4  # neither key: transformers' default, 3 hash layers first
    assert from_hf_config({**hf, "mlp_layer_types": None}).mlp_layer_types == hash_first
    del hf["layer_types"]  # the rates 4 / 8 from compress_rates map compress_ratios
    assert from_hf_config(hf) == cfg


V4_REJECTS = {
    "ratio": ({"compress_ratios": [0, 0, 16] + [4, 128] * 20 + [0]}, "[16] are neither 0 (sliding window)"),
    "mtp_ratio": ({"compress_ratios": [0, 0] + [4, 128] * 20 + [4, 4]}, "the MTP layers' [4] must be 0"),
    "length": ({"compress_ratios": [0, 0, 4]}, "one ratio per layer (43), then one per MTP layer (1)"),
    "layer_types": ({"layer_types": [CSA] * 43}, "layer_types=['compressed_sparse_attention', 'compre"),
    "hash": ({"mlp_layer_types": ["moe"] * 43}, "disagrees with num_hash_layers=3"),
    "kv_heads": ({"num_key_value_heads": 64}, "num_key_value_heads=64: DeepSeek-V4 attention shares one K=V head"),
    "groups": ({"n_group": 8}, "hf config.n_group=8: DeepSeek-V4 has n_group=1"),
    "rope_dim": ({"partial_rotary_factor": 0.25}, "qk_rope_head_dim and partial_rotary_factor disagree ([64, 128]"),
    "rope_type": ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling type 'linear'"),
    "yarn_scaled": (
        {"rope_scaling": {**V4_FLASH["rope_scaling"], "attention_factor": 1.3}}, "YaRN with attention_factor other"),
}  # fmt: skip


@pytest.mark.parametrize(("changes", "message"), V4_REJECTS.values(), ids=V4_REJECTS.keys())
def test_config_rejects(changes, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        from_hf_config({**copy.deepcopy(V4_FLASH), **changes})
    assert "\n" not in str(e.value)


def test_transformers_spelling_rejects():
    hf = to_transformers_spelling(V4_FLASH)
    del hf["rope_parameters"]["compress"]["attention_factor"]  # transformers would derive YaRN's mscale
    with pytest.raises(ConfigError, match="YaRN with attention_factor other than 1.0"):
        from_hf_config(hf)
    hf = to_transformers_spelling(V4_FLASH)
    hf["rope_parameters"]["main"]["rope_type"] = "yarn"
    with pytest.raises(ConfigError, match="sliding-window layers use plain RoPE only"):
        from_hf_config(hf)


# ---------------------------------------------------------------------------------------------
# The fixtures (tests/fixtures/v4_*, release names, fp32) and checkpoint errors.


@pytest.mark.parametrize("fixture", V4_FIXTURES, ids=lambda p: p.name)
def test_fixture_loads_and_exports_its_names(fixture, tmp_path):
    cfg, variables = load_hf(fixture)  # raises on any missing, unexpected or mis-shaped tensor
    save_hf(tmp_path, cfg, variables)
    original, exported = load_file(fixture / "model.safetensors"), read_dir(tmp_path)
    assert set(exported) == set(original) == release_names(cfg)
    for n, a in original.items():
        assert np.array_equal(exported[n], a), n


def test_checkpoint_errors_name_each_tensor(fp8_export, tmp_path):
    cfg, _, plain, _ = fp8_export
    hf = to_hf_config(cfg)
    sd = dict(plain)
    del sd["layers.1.attn.indexer.compressor.ape"]
    sd["layers.0.attn.indexer.wq_b.weight"] = sd["layers.1.attn.indexer.wq_b.weight"]  # layer 0 is sliding
    sd["layers.2.attn.wo_a.weight"] = sd["layers.2.attn.wo_a.weight"].T.copy()
    (tmp_path / "config.json").write_text(json.dumps(hf))
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_hf(tmp_path)
    lines = str(e.value).splitlines()
    assert "missing: layers.1.attn.indexer.compressor.ape" in lines[1]
    assert "mis-shaped: layers.2.attn.wo_a.weight: expected (32, 64), got (64, 32)" in lines[2]
    assert "unexpected: layers.0.attn.indexer.wq_b.weight" in lines[3] and len(lines) == 4


def test_checkpoint_without_mtp_loads_without_mtp(fp8_export, tmp_path):
    cfg, _, plain, _ = fp8_export
    (tmp_path / "config.json").write_text(json.dumps(to_hf_config(cfg)))
    save_file({n: a for n, a in plain.items() if not n.startswith("mtp.")}, tmp_path / "model.safetensors")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded_cfg, variables = load_hf(tmp_path, scan_layers=False)
    assert loaded_cfg == cfg.replace(num_nextn_predict_layers=0) and "mtp_0" not in variables["params"]
    assert any("holds no MTP tensors (mtp.0.*" in str(w.message) for w in caught)


def test_v4_flash_table_is_the_release_checkpoint():
    """The table for configs/deepseek_v4_flash.yaml, stored as the release stores it (e4m3 + one E8M0
    byte per 128x128 block; packed e2m1 + one E8M0 byte per 32 inputs; tid2eid int64; mHC, sinks, ape
    and the router bias fp32; everything else bf16), is the DeepSeek-V4-Flash checkpoint: its
    safetensors index lists 69,187 tensors (34,167 of them scales) and 159,609,485,896 bytes."""
    from dsjax.hf.tensors import hub_tensors

    table = hub_tensors(load_config(ROOT / "configs" / "deepseek_v4_flash.yaml").model)
    stored = 0
    for t in table:
        out, inp = t.hub_shape if len(t.hub_shape) == 2 else (t.hub_shape[0], 1)
        if t.quant == "fp8":
            stored += out * inp + -(-out // 128) * -(-inp // 128)
        elif t.quant == "fp4":
            stored += out * inp // 2 + out * inp // 32
        else:
            width = 8 if t.ids else 4 if (t.fp32 or t.name.endswith("gate.bias")) else 2
            stored += int(np.prod(t.hub_shape)) * width
    assert (len(table), sum(t.quant is not None for t in table)) == (69_187 - 34_167, 34_167)
    assert stored == 159_609_485_896
