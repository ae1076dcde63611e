"""Checkpoint converter: hub import -> export -> import is bitwise identical (single file and sharded),
FP8 block dequantization within e4m3 rounding, the MTP layer, and errors that name each bad tensor."""

import json
import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dsjax.cli.convert import main as convert_main
from dsjax.config import load_config
from dsjax.hf import CheckpointError, from_hf_config, from_hf_state_dict, load_hf, save_hf, summary, to_fp8_weights
from dsjax.hf.checkpoint import dequantize_fp8
from dsjax.hf.safetensors import read_tensors
from dsjax.model import Transformer, abstract_variables

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
TINY = ROOT / "configs" / "tiny.yaml"
E4M3_MAX = 448.0
# The linears DeepSeek-V3's FP8 release quantizes: attention projections, dense MLP, routed and shared
# experts (not the embedding, norms, router gate or lm_head).
QUANTIZED = re.compile(
    r"(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight$"
)


def assert_same_variables(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and np.array_equal(x, y), jax.tree_util.keystr(path)


def write_checkpoint(path: Path, hf_config: dict, tensors: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config))
    save_file(tensors, path / "model.safetensors")
    return path


def fixture_checkpoint(tmp_path: Path, name: str, edit=lambda sd: None) -> Path:
    """A copy of fixture ``name`` whose tensors ``edit`` may change in place."""
    sd = dict(load_file(FIXTURES / name / "model.safetensors"))
    edit(sd)
    return write_checkpoint(tmp_path / name, json.loads((FIXTURES / name / "config.json").read_text()), sd)


# ---------------------------------------------------------------------------------------------
# Round trips.


@pytest.mark.parametrize("max_shard_bytes", [2**30, 100_000], ids=["single", "sharded"])
def test_import_export_import_is_bitwise(tmp_path, hf_fixture, max_shard_bytes):
    name = hf_fixture
    cfg, variables = load_hf(FIXTURES / name)
    save_hf(tmp_path / "out", cfg, variables, max_shard_bytes=max_shard_bytes)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    if max_shard_bytes == 2**30:
        assert files == ["config.json", "model.safetensors"]
    else:
        assert len(files) > 3 and "model.safetensors.index.json" in files
        index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"].values()) == set(files) - {"config.json", "model.safetensors.index.json"}
    cfg2, variables2 = load_hf(tmp_path / "out")
    assert cfg2 == cfg
    assert_same_variables(variables, variables2)
    # The export holds exactly the fixture's hub tensors (names, dtypes, values) as transformers wrote them.
    exported = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        exported.update(load_file(f))
    original = load_file(FIXTURES / name / "model.safetensors")
    assert sorted(exported) == sorted(original)
    for n, a in original.items():
        assert exported[n].dtype == a.dtype and np.array_equal(exported[n], a), n


def nonzero_variables(cfg, seed: int = 0) -> dict:
    """Every variable of the model, all non-zero (so a dropped one shows), without running init; integer
    ones (V4's hash tables) random expert ids."""
    rng = np.random.default_rng(seed)

    def draw(s):
        if np.issubdtype(s.dtype, np.integer):
            return rng.integers(0, cfg.n_routed_experts, s.shape).astype(s.dtype)
        return rng.normal(0, 0.1, s.shape).astype(s.dtype)

    return jax.tree.map(draw, nn.meta.unbox(abstract_variables(cfg)))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """configs/tiny.yaml (1 MTP module) with random variables, saved: (cfg, variables, dir)."""
    cfg = load_config(TINY).model
    variables = nonzero_variables(cfg)
    path = tmp_path_factory.mktemp("tiny") / "ckpt"
    save_hf(path, cfg, variables)
    return cfg, variables, path


def test_mtp_checkpoint_round_trip(tiny_checkpoint):
    cfg, variables, path = tiny_checkpoint
    mtp = f"model.layers.{cfg.num_hidden_layers}."
    names = set(load_file(path / "model.safetensors"))
    assert {mtp + "eh_proj.weight", mtp + "embed_tokens.weight", mtp + "shared_head.head.weight"} <= names
    loaded_cfg, loaded = load_hf(path)
    assert loaded_cfg == cfg
    assert_same_variables(variables, loaded)
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, cfg.vocab_size)
    apply = jax.jit(Transformer(cfg).apply)
    want, got = apply(variables, tokens), apply(loaded, tokens)
    assert got.mtp_logits.shape == (1, 2, 10, cfg.vocab_size) and np.isfinite(np.asarray(got.mtp_logits)).all()
    np.testing.assert_array_equal(np.asarray(got.mtp_logits), np.asarray(want.mtp_logits))
    np.testing.assert_array_equal(np.asarray(got.logits), np.asarray(want.logits))


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.scan_layers=false", "model.num_nextn_predict_layers=2", "model.param_dtype=bfloat16"],
        ["model.tie_word_embeddings=true", "model.q_lora_rank=null", "model.first_k_dense_replace=0"],
        ["model.scoring_func=softmax", "model.topk_method=group_limited_greedy", "model.n_shared_experts=0"],
    ],
    ids=["unrolled_mtp2_bf16", "tied_noqlora_nodense", "v2_softmax"],
)
def test_every_variable_round_trips(tmp_path, overrides):
    """The name table covers every variable of the model, whatever the config (the V2-style selection
    bias, which V2 checkpoints lack, is written because it is non-zero)."""
    cfg = load_config(TINY, overrides).model
    variables = nonzero_variables(cfg)
    save_hf(tmp_path / "ckpt", cfg, variables, max_shard_bytes=200_000)
    loaded_cfg, loaded = load_hf(tmp_path / "ckpt", scan_layers=cfg.scan_layers)
    assert loaded_cfg == cfg
    assert_same_variables(variables, loaded)


def test_checkpoint_without_mtp_tensors_loads_without_mtp(tiny_checkpoint, tmp_path):
    cfg, variables, path = tiny_checkpoint  # num_nextn_predict_layers: 1
    sd = load_file(path / "model.safetensors")
    hf = json.loads((path / "config.json").read_text())
    mtp = f"model.layers.{cfg.num_hidden_layers}."
    write_checkpoint(tmp_path / "nomtp", hf, {n: a for n, a in sd.items() if not n.startswith(mtp)})  # as HF saves it
    with pytest.warns(UserWarning, match=r"no MTP tensors .* loading without MTP \(num_nextn_predict_layers=0\)"):
        loaded_cfg, loaded = load_hf(tmp_path / "nomtp")
    assert loaded_cfg == cfg.replace(num_nextn_predict_layers=0)
    want = {c: {k: v for k, v in tree.items() if k != "mtp_0"} for c, tree in variables.items()}
    assert_same_variables(want, loaded)

    # Part of the MTP layer present is not "no MTP": the rest is reported missing.
    write_checkpoint(tmp_path / "partial", hf, {n: a for n, a in sd.items() if not n.startswith(mtp + "mlp.")})
    with pytest.raises(CheckpointError, match=f"missing: {re.escape(mtp)}mlp.gate.weight"):
        load_hf(tmp_path / "partial")


def test_cli_reexports_in_bfloat16_and_summarises(tmp_path, capsys):
    src = FIXTURES / "v3_no_qlora"
    assert convert_main([str(src), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    cfg, variables = load_hf(tmp_path / "bf16")
    assert cfg.param_dtype == "bfloat16"
    _, fp32 = load_hf(src)
    want = {**fp32, "params": jax.tree.map(lambda a: a.astype(ml_dtypes.bfloat16), fp32["params"])}
    assert_same_variables(want, variables)
    assert "ok, config (2 layers" in capsys.readouterr().out
    assert convert_main([str(src), str(tmp_path / "bf16")]) == 2  # DST not empty
    assert "not empty" in capsys.readouterr().err
    assert "bfloat16" in summary(tmp_path / "bf16")


def test_save_refuses_non_empty_directory_unless_overwrite(tmp_path):
    cfg, variables = load_hf(FIXTURES / "v3_no_qlora")
    out = tmp_path / "out"
    out.mkdir()  # an empty directory is fine
    save_hf(out, cfg, variables)
    with pytest.raises(FileExistsError, match="not empty"):
        save_hf(out, cfg, variables)
    (out / "stale.safetensors").write_bytes(b"")
    save_hf(out, cfg, variables, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directories left
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


# ---------------------------------------------------------------------------------------------
# FP8 (e4m3 weights, one fp32 scale_inv per block).


def quantize_fp8(w: np.ndarray, block: tuple[int, int], ue8m0: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek-V3's weight quantization: per (zero-padded) block, scale = amax / 448 (``ue8m0``, as
    V3.1 on: rounded up to a power of two), q = e4m3(w / scale)."""
    (out, inp), (b0, b1) = w.shape, block
    nb = (-(-out // b0), -(-inp // b1))
    padded = np.zeros((nb[0] * b0, nb[1] * b1), np.float32)
    padded[:out, :inp] = w
    blocks = padded.reshape(nb[0], b0, nb[1], b1)
    scale = (np.maximum(np.abs(blocks).max((1, 3)), 1e-4) / E4M3_MAX).astype(np.float32)
    if ue8m0:
        scale = (2.0 ** np.ceil(np.log2(scale.astype(np.float64)))).astype(np.float32)
    q = (blocks / scale[:, None, :, None]).reshape(padded.shape)[:out, :inp]
    return q.astype(ml_dtypes.float8_e4m3fn), scale


def per_element(scale: np.ndarray, block: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    return np.repeat(np.repeat(scale, block[0], 0), block[1], 1)[: shape[0], : shape[1]]


def e4m3_bound(w: np.ndarray, scale_per_element: np.ndarray) -> np.ndarray:
    """|dequant - w| <= half an e4m3 spacing: 2^-4 |w| for normals (3 mantissa bits), 2^-10 * scale for
    subnormals (spacing 2^-9 below 2^-6), plus fp32 rounding of w / scale and of q * scale."""
    return (2.0**-4 + 2.0**-20) * np.abs(w) + 2.0**-10 * scale_per_element * (1 + 2.0**-20)


def test_dequantize_fp8_ragged_blocks():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((300, 200)) * np.exp(rng.uniform(-4, 2, (300, 1)))).astype(np.float32)
    q, scale = quantize_fp8(w, (128, 128))
    assert scale.shape == (3, 2)  # 300 = 128 + 128 + 44 rows, 200 = 128 + 72 columns
    got = dequantize_fp8(q, scale, (128, 128))
    want = np.empty_like(w)
    for i in range(3):
        for j in range(2):
            blk = np.s_[128 * i : 128 * (i + 1), 128 * j : 128 * (j + 1)]
            want[blk] = q[blk].astype(np.float32) * scale[i, j]
    np.testing.assert_array_equal(got, want)
    s = per_element(scale, (128, 128), w.shape)
    err = np.abs(got - w)
    assert (err <= e4m3_bound(w, s)).all()
    assert (err / (np.abs(w) + s)).max() > 2.0**-6  # it really was rounded to 3 mantissa bits


def fp8_checkpoint(tmp_path: Path, block: tuple[int, int]) -> tuple[Path, dict, dict]:
    """v3_qlora_groups with V3's quantized linears in e4m3 + block scales: (dir, fp32 tensors, fp8 tensors)."""
    name = "v3_qlora_groups"
    sd = load_file(FIXTURES / name / "model.safetensors")
    out = dict(sd)
    for n, w in sd.items():
        if QUANTIZED.search(n):
            out[n], out[n + "_scale_inv"] = quantize_fp8(w, block)
    hf = json.loads((FIXTURES / name / "config.json").read_text())
    hf["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
    }
    return write_checkpoint(tmp_path / "fp8", hf, out), sd, out


@pytest.mark.parametrize("block", [(128, 128), (32, 48)], ids=["128x128", "32x48"])
def test_fp8_checkpoint_loads_within_e4m3_rounding(tmp_path, block):
    path, original, fp8 = fp8_checkpoint(tmp_path, block)
    # 3 layers x 5 attention projections + 3 dense MLP + 2 MoE layers x (3 shared + 8 experts x 3)
    assert sum(a.dtype == ml_dtypes.float8_e4m3fn for a in fp8.values()) == 72
    cfg, variables = load_hf(path)
    assert "quantization: FP8" in summary(path)
    save_hf(tmp_path / "export", cfg, variables)  # back to hub layout, fp32
    exported = load_file(tmp_path / "export" / "model.safetensors")
    assert sorted(exported) == sorted(original)
    worst = 0.0
    for n, w in original.items():
        if n + "_scale_inv" not in fp8:
            np.testing.assert_array_equal(exported[n], w, err_msg=n)  # embedding, norms, gate, head: exact
            continue
        scale = per_element(fp8[n + "_scale_inv"], block, w.shape)
        np.testing.assert_array_equal(exported[n], fp8[n].astype(np.float32) * scale, err_msg=n)
        err = np.abs(exported[n] - w)
        assert (err <= e4m3_bound(w, scale)).all(), n
        worst = max(worst, (err / e4m3_bound(w, scale)).max())
    assert worst > 0.5  # the bound is nearly reached: the weights really went through e4m3


def test_fp8_model_logits_close_to_fp32(tmp_path):
    path, _, _ = fp8_checkpoint(tmp_path, (128, 128))
    cfg, fp8 = load_hf(path)
    _, fp32 = load_hf(FIXTURES / "v3_qlora_groups")
    # Pin the routing (as test_model's bf16 test does): with ~1e-3 routing margins, rounding flips expert
    # choices, which moves those tokens' logits by a lot in any low-precision model.
    bias = np.tile(np.linspace(0, 7, cfg.n_routed_experts, dtype=np.float32), (cfg.num_moe_layers, 1))
    for v in (fp8, fp32):
        v["selection_bias"]["moe_layers"]["layers"]["mlp"]["e_score_correction_bias"] = bias
    tokens = jnp.asarray(np.load(FIXTURES / "v3_qlora_groups" / "reference.npz")["input_ids"])
    apply = jax.jit(Transformer(cfg).apply)
    want, got = np.asarray(apply(fp32, tokens).logits), np.asarray(apply(fp8, tokens).logits)
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    # e4m3 rounds each weight by up to 2^-4 (rms ~2.5%); through 3 layers that is ~6.5% here, 8x the 0.8%
    # of rounding every weight to bf16 (2^-9) instead.
    assert 1e-3 < rel < 0.1, rel
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


def test_fp8_weights_keep_the_release_bytes_and_export_them_back(tmp_path):
    """load_hf(fp8_weights=True) keeps each quantized tensor's e4m3 bytes and scales (transposed to our
    layout, nothing re-rounded); export writes the FP8 release back byte for byte, and re-imports."""
    path, _, fp8 = fp8_checkpoint(tmp_path, (128, 128))
    cfg, v = load_hf(path, fp8_weights=True)
    assert cfg.fp8_weights
    attn = v["params"]["moe_layers"]["layers"]["self_attn"]["kv_b_proj"]
    hub = fp8["model.layers.1.self_attn.kv_b_proj.weight"]  # layer 1 = MoE layer 0
    assert attn["kernel"].dtype == ml_dtypes.float8_e4m3fn
    np.testing.assert_array_equal(attn["kernel"][0].reshape(hub.shape[1], -1).view(np.uint8), hub.T.view(np.uint8))
    np.testing.assert_array_equal(
        attn["kernel_scale_inv"][0], fp8["model.layers.1.self_attn.kv_b_proj.weight_scale_inv"].T
    )
    experts = v["params"]["moe_layers"]["layers"]["mlp"]
    np.testing.assert_array_equal(
        experts["w_down_scale_inv"][1, 5], fp8["model.layers.2.mlp.experts.5.down_proj.weight_scale_inv"].T
    )
    assert v["params"]["lm_head"]["kernel"].dtype == np.float32  # not a quantized layer

    save_hf(tmp_path / "export", cfg, v)
    back = read_tensors(tmp_path / "export")
    assert sorted(back) == sorted(fp8)
    for n, a in fp8.items():
        assert back[n].dtype == a.dtype and np.array_equal(back[n].view(np.uint8), a.view(np.uint8)), n
    hf = json.loads((tmp_path / "export" / "config.json").read_text())
    assert hf["quantization_config"]["quant_method"] == "fp8" and hf["quantization_config"]["weight_block_size"] == [
        128,
        128,
    ]
    assert_same_variables(load_hf(tmp_path / "export", fp8_weights=True)[1], v)
    assert "FP8, 128x128 blocks" in summary(tmp_path / "export")


@pytest.mark.parametrize("source", ["fp32", "fp8_32x48"])
def test_fp8_weights_quantized_on_load(tmp_path, source):
    """A checkpoint in another precision or block size loads with fp8_weights=True by quantizing each
    V3-quantized weight into 128x128 blocks: the test's own numpy quantizer gives the same bytes."""
    if source == "fp32":
        path, hub = FIXTURES / "v3_qlora_groups", load_file(FIXTURES / "v3_qlora_groups" / "model.safetensors")
    else:
        path, _, stored = fp8_checkpoint(tmp_path, (32, 48))
        hub = {
            n: dequantize_fp8(a, stored[n + "_scale_inv"], (32, 48)) if n + "_scale_inv" in stored else a
            for n, a in stored.items()
            if not n.endswith("_scale_inv")
        }
    cfg, v = load_hf(path, fp8_weights=True)
    checked = 0
    for name, ours in (
        ("model.layers.0.self_attn.o_proj.weight", v["params"]["dense_layers"]["layers"]["self_attn"]["o_proj"]),
        ("model.layers.0.mlp.down_proj.weight", v["params"]["dense_layers"]["layers"]["mlp"]["down_proj"]),
    ):
        q, scale = quantize_fp8(hub[name], (128, 128))
        got = ours["kernel"][0].reshape(q.shape[1], q.shape[0]).T
        np.testing.assert_array_equal(got.view(np.uint8), q.view(np.uint8), err_msg=name)
        np.testing.assert_allclose(ours["kernel_scale_inv"][0].T, scale, rtol=1e-6, err_msg=name)
        checked += 1
    q, scale = quantize_fp8(hub["model.layers.1.mlp.experts.3.gate_proj.weight"], (128, 128))
    np.testing.assert_array_equal(
        v["params"]["moe_layers"]["layers"]["mlp"]["w_gate"][0, 3].T.view(np.uint8), q.view(np.uint8)
    )
    assert checked == 2


def test_ue8m0_scales_on_load_and_in_the_exported_config(tmp_path):
    """fp8_scale_fmt ue8m0 (DeepSeek-V3.1 on): weights quantized on load get power-of-two scales --
    numpy's bytes; the export says scale_fmt ue8m0, and loading it back with fp8_weights keeps it."""
    hub = load_file(FIXTURES / "v3_qlora_groups" / "model.safetensors")
    cfg, v = load_hf(FIXTURES / "v3_qlora_groups", fp8_weights=True, fp8_scale_fmt="ue8m0")
    ours = v["params"]["dense_layers"]["layers"]["self_attn"]["o_proj"]
    q, scale = quantize_fp8(hub["model.layers.0.self_attn.o_proj.weight"], (128, 128), ue8m0=True)
    np.testing.assert_array_equal(ours["kernel"][0].reshape(q.shape[1], q.shape[0]).T.view(np.uint8), q.view(np.uint8))
    np.testing.assert_array_equal(ours["kernel_scale_inv"][0].T, scale)
    save_hf(tmp_path / "export", cfg, v)
    assert json.loads((tmp_path / "export" / "config.json").read_text())["quantization_config"]["scale_fmt"] == "ue8m0"
    back_cfg, back = load_hf(tmp_path / "export", fp8_weights=True)
    assert back_cfg.fp8_scale_fmt == "ue8m0"
    assert_same_variables(back, v)
    assert load_hf(tmp_path / "export")[0].fp8_scale_fmt == "float32"  # dequantized: no FP8 GEMMs to scale


def test_fp8_weights_model_close_to_dequantized_model(tmp_path):
    """The FP8-inference model (e4m3 weights kept, activations in 1x128 tiles) vs the same weights
    dequantized in fp32 (routing pinned as in the test above): close, same argmax almost everywhere.
    Quantizing the dequantized variables in memory (to_fp8_weights) gives the release's bytes back."""
    path, _, _ = fp8_checkpoint(tmp_path, (128, 128))
    cfg8, v8 = load_hf(path, fp8_weights=True)
    cfg, v = load_hf(path)
    bias = np.tile(np.linspace(0, 7, cfg.n_routed_experts, dtype=np.float32), (cfg.num_moe_layers, 1))
    for variables in (v8, v):
        variables["selection_bias"]["moe_layers"]["layers"]["mlp"]["e_score_correction_bias"] = bias
    tokens = jnp.asarray(np.load(FIXTURES / "v3_qlora_groups" / "reference.npz")["input_ids"])
    want = np.asarray(jax.jit(Transformer(cfg).apply)(v, tokens).logits)
    got = np.asarray(jax.jit(Transformer(cfg8).apply)(v8, tokens).logits)
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert 1e-3 < rel < 0.1, rel  # activations through e4m3 (2^-4 relative) in every projection
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9
    cfg_q, v_q = to_fp8_weights(cfg, v)
    assert cfg_q == cfg8
    assert_same_variables(v_q, v8)
    assert to_fp8_weights(cfg8, v8)[1] is v8  # already FP8: unchanged


def test_convert_cli_fp8(tmp_path):
    """dsjax-convert SRC DST --fp8 writes V3's FP8 layout from an fp32 checkpoint."""
    assert convert_main([str(FIXTURES / "v3_no_qlora"), str(tmp_path / "out"), "--fp8"]) == 0
    back = read_tensors(tmp_path / "out")
    quantized = [n for n in back if QUANTIZED.search(n)]
    assert quantized and all(back[n].dtype == ml_dtypes.float8_e4m3fn and n + "_scale_inv" in back for n in quantized)
    assert all(back[n].dtype == np.float32 for n in back if not QUANTIZED.search(n))  # scales, norms, gate, head, ...


def test_fp8_errors(tmp_path):
    path, _, sd = fp8_checkpoint(tmp_path, (128, 128))
    hf = json.loads((path / "config.json").read_text())
    n = "model.layers.0.self_attn.o_proj.weight"
    write_checkpoint(tmp_path / "noscale", hf, {k: v for k, v in sd.items() if k != n + "_scale_inv"})
    with pytest.raises(CheckpointError, match=f"missing: {re.escape(n)}_scale_inv"):
        load_hf(tmp_path / "noscale")
    write_checkpoint(tmp_path / "badscale", hf, {**sd, n + "_scale_inv": np.ones((2, 1), np.float32)})
    with pytest.raises(CheckpointError, match=rf"mis-shaped: {re.escape(n)}_scale_inv: expected \(1, 1\), got \(2, 1"):
        load_hf(tmp_path / "badscale")
    write_checkpoint(tmp_path / "awq", {**hf, "quantization_config": {"quant_method": "awq"}}, sd)
    with pytest.raises(CheckpointError, match="only quant_method 'fp8'"):
        load_hf(tmp_path / "awq")


# ---------------------------------------------------------------------------------------------
# Errors that name each bad tensor or file.


def test_missing_tensor_is_named(tmp_path):
    n = "model.layers.1.mlp.experts.3.up_proj.weight"
    with pytest.raises(CheckpointError, match=f"missing: {re.escape(n)}"):
        load_hf(fixture_checkpoint(tmp_path, "v3_no_qlora", lambda sd: sd.pop(n)))


def test_unexpected_tensor_is_named(tmp_path):
    n = "model.layers.7.mlp.gate.weight"
    with pytest.raises(CheckpointError, match=f"unexpected: {re.escape(n)}"):
        load_hf(fixture_checkpoint(tmp_path, "v3_no_qlora", lambda sd: sd.update({n: np.zeros((8, 64), np.float32)})))


def test_misshaped_tensor_is_named(tmp_path):
    n = "model.layers.0.self_attn.o_proj.weight"
    with pytest.raises(CheckpointError, match=rf"mis-shaped: {re.escape(n)}: expected \(64, 64\), got \(64, 63\)"):
        load_hf(fixture_checkpoint(tmp_path, "v3_no_qlora", lambda sd: sd.update({n: sd[n][:, :-1].copy()})))


def test_every_error_is_listed_at_once(tmp_path):
    def edit(sd):
        sd.pop("model.norm.weight")
        sd.pop("lm_head.weight")
        sd["extra.weight"] = np.zeros(3, np.float32)

    with pytest.raises(CheckpointError) as e:
        load_hf(fixture_checkpoint(tmp_path, "v3_no_qlora", edit))
    for line in ("missing: model.norm.weight", "missing: lm_head.weight", "unexpected: extra.weight"):
        assert line in str(e.value)


def test_mtp_copy_that_differs_is_an_error(tiny_checkpoint, tmp_path):
    cfg, _, path = tiny_checkpoint
    sd = dict(load_file(path / "model.safetensors"))
    n = f"model.layers.{cfg.num_hidden_layers}.shared_head.head.weight"
    sd[n] = sd[n] + 1
    write_checkpoint(tmp_path / "bad", json.loads((path / "config.json").read_text()), sd)
    with pytest.raises(CheckpointError, match=f"{re.escape(n)}: differs from lm_head.weight"):
        load_hf(tmp_path / "bad")


def test_sharded_checkpoint_with_a_missing_shard_names_the_file(tmp_path):
    cfg, variables = load_hf(FIXTURES / "v3_no_qlora")
    save_hf(tmp_path / "ckpt", cfg, variables, max_shard_bytes=100_000)
    (tmp_path / "ckpt" / "model-00002-of-00005.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard files that do not exist: model-00002-of-00005.safetensors"):
        load_hf(tmp_path / "ckpt")


def test_state_dict_errors_name_every_tensor():
    cfg = from_hf_config(FIXTURES / "v3_no_qlora")
    sd = dict(load_file(FIXTURES / "v3_no_qlora" / "model.safetensors"))
    sd.pop("model.layers.1.mlp.experts.3.up_proj.weight")
    sd["model.layers.0.self_attn.o_proj.weight"] = sd["model.layers.0.self_attn.o_proj.weight"][:, :-1]
    sd["model.layers.7.mlp.gate.weight"] = np.zeros((8, 64), np.float32)
    with pytest.raises(CheckpointError) as e:
        from_hf_state_dict(cfg, sd)
    msg = str(e.value)
    assert "missing: model.layers.1.mlp.experts.3.up_proj.weight" in msg
    assert "mis-shaped: model.layers.0.self_attn.o_proj.weight: expected (64, 64), got (64, 63)" in msg
    assert "unexpected: model.layers.7.mlp.gate.weight" in msg
