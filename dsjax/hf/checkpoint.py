"""Hub-format checkpoints (HF safetensors names) <-> dsjax variables.

    cfg, variables = load_hf("path/to/DeepSeek-V3")        # config.json + *.safetensors -> Transformer(cfg)
    cfg, variables = load_hf(path, fp8_weights=True)        # FP8 inference: e4m3 weights + block scales kept
    save_hf("out/", cfg, variables)                          # the same format back
    variables = from_hf_state_dict(cfg, state_dict)         # hub-named arrays already in memory

Both directions walk one table, ``dsjax.hf.tensors.hub_tensors``. Files are memory-mapped and read
tensor by tensor into preallocated variables (``dsjax.hf.safetensors``). FP8 releases
(``quantization_config.quant_method: fp8``) are dequantized, weight (e4m3) x weight_scale_inv per
128x128 block, to the param dtype; or, with ``fp8_weights=True`` (FP8 inference), kept as they are:
the e4m3 bytes and scales only transposed to our layout (other checkpoints are quantized on load, and
``to_fp8_weights`` quantizes variables in memory). Such variables export as an FP8 release again, as does
``save_hf(..., fp8=True)``.

DeepSeek-V4's release (DeepSeek-V4-Flash) has a format of its own: the linears of ``HubTensor.quant ==
"fp8"`` in e4m3 with one E8M0 (power-of-two, ml_dtypes.float8_e8m0fnu) scale per 128x128 block of the
[out, in] weight, the routed experts packed FP4 (e2m1, two per int8 byte: element 2j in the low nibble,
2j+1 in the high one) with one E8M0 scale per 32 consecutive inputs (MXFP4), each weight's scales in a
sibling ``<module>.scale``; the rest bf16 / fp32, tid2eid int64. Both are dequantized on load (with
``fp8_weights``, the e4m3 ones keep their bytes and FP4 experts are requantized to e4m3 blocks).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path

import flax.linen as nn
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from dsjax.config import ModelConfig
from dsjax.hf.config import from_hf_config, to_hf_config
from dsjax.hf.safetensors import read_tensors, shard_groups
from dsjax.hf.tensors import FP4_BLOCK, CheckpointError, HubTensor, hub_tensors, leaf_at, mtp_copies, mtp_prefix
from pallas_kernels.quant import TILE as FP8_BLOCK
from pallas_kernels.quant import block_count, quantize_blocks

E8M0 = ml_dtypes.float8_e8m0fnu
FP4_MAX = 6.0  # largest e2m1 value


def from_hf_state_dict(cfg: ModelConfig, state_dict: Mapping[str, np.ndarray]) -> dict:
    """Hub-named tensors -> ``{"params", "selection_bias"}`` (numpy, params in cfg.param_dtype).

    Raises CheckpointError naming every missing, unexpected and mis-shaped tensor.
    """
    return _assemble(cfg, state_dict, None)


def _assemble(c: ModelConfig, sd: Mapping[str, np.ndarray], block: tuple[int, int] | None) -> dict:
    """Checks ``sd`` against the table, then copies it tensor by tensor into freshly allocated variables."""
    table = hub_tensors(c)
    _check(c, table, sd, block)
    variables = _allocate(table, jnp.dtype(c.param_dtype))
    for t in table:
        if t.name not in sd:
            continue
        a, scale = sd[t.name], sd.get(_scale_name(c, t)) if block else None
        if t.fp8:
            q, s = _fp8_weight(t, a, scale, block, c.fp8_scale_fmt == "ue8m0")
            leaf_at(variables, t.path)[t.index], leaf_at(variables, t.scale_path)[t.index] = q, s
        else:
            leaf_at(variables, t.path)[t.index] = t.to_ours(_dequantize(t, a, scale, block))
    return variables


def _scale_name(c: ModelConfig, t: HubTensor) -> str:
    """The hub name of a quantized weight's scales: V3 ``<weight>_scale_inv``, V4 ``<module>.scale``."""
    return t.name.removesuffix(".weight") + ".scale" if c.is_v4 else t.name + "_scale_inv"


def _dequantize(t: HubTensor, a: np.ndarray, scale: np.ndarray | None, block) -> np.ndarray:
    """A stored weight in hub layout, unquantized: packed FP4 (a V4 expert stored int8) or e4m3 times its
    scales, else as stored."""
    if scale is None:
        return a
    if t.quant == "fp4" and a.dtype == np.int8:
        return dequantize_fp4(a, scale)[:, : t.hub_shape[1]]
    return dequantize_fp8(a, scale, block)


def _fp8_weight(
    t: HubTensor, a: np.ndarray, scale: np.ndarray | None, block, pow2: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(e4m3 [ours], scale_inv [K/128, N/128]) for an FP8-stored leaf: the release's own bytes when it
    ships e4m3 in 128x128 blocks (only transposed), else quantized here (V3's recipe, ``quantize_blocks``;
    ``pow2``: UE8M0 scales)."""
    if scale is not None and a.dtype == ml_dtypes.float8_e4m3fn and tuple(block) == (FP8_BLOCK, FP8_BLOCK):
        return t.to_ours(a), np.asarray(scale, np.float32).T
    w = _dequantize(t, a, scale, block)
    k, n = t.hub_shape[::-1]
    q, s = quantize_blocks(jnp.asarray(t.to_ours(w), jnp.float32).reshape(k, n), pow2)
    return np.asarray(q)[:k, :n].reshape(t.shape), np.asarray(s)


def _allocate(table: list[HubTensor], param_dtype: np.dtype) -> dict:
    """Zeroed variables for every leaf the table names: params in param_dtype (FP8-stored ones e4m3,
    with their fp32 scale_inv leaves; ``HubTensor.fp32`` ones fp32), selection_bias fp32 (V4's tid2eid int32)."""
    leaves: dict[tuple, list[HubTensor]] = {}
    for t in table:
        leaves.setdefault(t.path, []).append(t)
    variables: dict = {"params": {}, "selection_bias": {}}

    def put(path, shape, dtype):
        node = variables
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.zeros(shape, dtype)

    for path, ts in leaves.items():
        t = ts[0]
        lead = tuple(max(t.index[a] for t in ts) + 1 for a in range(len(t.index)))
        if t.fp8:
            put(path, (*lead, *t.shape), ml_dtypes.float8_e4m3fn)
            put(t.scale_path, (*lead, *t.scale_shape), np.float32)
        else:
            dtype = np.int32 if t.ids else np.float32 if t.fp32 or path[0] != "params" else param_dtype
            put(path, (*lead, *t.shape), dtype)
    return variables


def _check(c: ModelConfig, table: list[HubTensor], sd: Mapping[str, np.ndarray], block: tuple[int, int] | None) -> None:
    """Raises CheckpointError naming every missing, unexpected and mis-shaped tensor (FP8 scales included)."""
    missing, misshaped, known = [], [], set()

    def expect(name: str, shape: tuple[int, ...], optional: bool = False):
        known.add(name)
        if name not in sd:
            if not optional:
                missing.append(name)
        elif tuple(sd[name].shape) != tuple(shape):
            misshaped.append(f"{name}: expected {tuple(shape)}, got {tuple(sd[name].shape)}")

    for t in table:
        fp4 = block and t.quant == "fp4" and t.name in sd and sd[t.name].dtype == np.int8  # V4's FP4 experts
        expect(t.name, t.fp4_shapes[0] if fp4 else t.hub_shape, t.optional)
        scale = _scale_name(c, t)
        if block and t.name in sd and (fp4 or sd[t.name].dtype == ml_dtypes.float8_e4m3fn or scale in sd):
            expect(scale, t.fp4_shapes[1] if fp4 else tuple(-(-n // b) for n, b in zip(t.hub_shape, block)))
    for copy, shared in mtp_copies(c):
        expect(copy, next(t.hub_shape for t in table if t.name == shared), optional=True)
        same_shape = copy in sd and shared in sd and sd[copy].shape == sd[shared].shape
        if same_shape and not np.array_equal(sd[copy], sd[shared]):
            misshaped.append(f"{copy}: differs from {shared}, but dsjax shares embedding and head with MTP")

    unexpected = sorted(set(sd) - known)
    if missing or misshaped or unexpected:
        lines = [f"checkpoint does not match {_describe(c)}:"]
        lines += [f"  missing: {n}" for n in missing]
        lines += [f"  mis-shaped: {n}" for n in misshaped]
        lines += [f"  unexpected: {n}" for n in unexpected]
        if c.num_nextn_predict_layers and not any(n.startswith(mtp_prefix(c)) for n in sd):
            lines.append("  (no MTP tensors: set num_nextn_predict_layers=0 to load without MTP, as load_hf does)")
        raise CheckpointError("\n".join(lines))


def _describe(c: ModelConfig) -> str:
    if c.is_v4:
        kinds = Counter(c.layer_types)
        return (
            f"config ({c.num_hidden_layers} layers: {kinds['sliding_attention']} sliding, "
            f"{kinds['compressed_sparse_attention']} CSA, {kinds['heavily_compressed_attention']} HCA; "
            f"{c.mlp_layer_types.count('hash_moe')} hash-routed, {c.n_routed_experts} experts, "
            f"{c.num_nextn_predict_layers} MTP)"
        )
    return (
        f"config ({c.num_hidden_layers} layers, {c.first_k_dense_replace} dense, {c.n_routed_experts} experts, "
        f"q_lora_rank={c.q_lora_rank}, {c.num_nextn_predict_layers} MTP)"
    )


def dequantize_fp8(w: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """fp32 W = W_fp8 * scale_inv of its (block[0] x block[1]) block; ragged edge blocks are cropped."""
    s = np.repeat(np.repeat(np.asarray(scale_inv, np.float32), block[0], 0), block[1], 1)
    return w.astype(np.float32) * s[: w.shape[0], : w.shape[1]]


def dequantize_fp4(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """fp32 [out, 2 * packed cols] of V4's FP4 experts: int8 [out, in / 2] bytes holding e2m1 elements 2j (low
    nibble) and 2j+1 (high nibble), times scale [out, in / 32] (E8M0), one per 32 inputs. The nibble order is
    transformers' (Fp8Dequantize._unpack_fp4); the codes are OCP MX's e2m1 (ml_dtypes.float4_e2m1fn)."""
    u = packed.view(np.uint8)
    codes = np.stack([u & 0xF, u >> 4], axis=-1).reshape(u.shape[0], -1)
    w = codes.view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    return w * np.repeat(np.asarray(scale, np.float32), FP4_BLOCK, axis=1)[:, : w.shape[1]]


def _pow2_ceil(x: np.ndarray) -> np.ndarray:
    """The least power of two >= x > 0 (float32): a UE8M0 scale."""
    m, e = np.frexp(x.astype(np.float32))
    return np.ldexp(np.float32(1), e - (m == 0.5)).astype(np.float32)


def quantize_fp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """V4's FP4 experts from fp32 [out, in]: (int8 [out, ceil(in / 2)] packed e2m1, E8M0 [out, ceil(in / 32)]).
    Per 32 inputs s = 2^ceil(log2(amax / 6)) and e2m1(w / s) rounded to nearest even, as the release's
    ``fp4_act_quant`` (kernel.py) quantizes with E8M0 scales (amax clamped to 6 * 2^-126); a ragged last block
    (never in the release) is zero-padded."""
    n_out, n_in = w.shape
    b = np.pad(np.asarray(w, np.float32), ((0, 0), (0, -n_in % FP4_BLOCK))).reshape(n_out, -1, FP4_BLOCK)
    s = _pow2_ceil(np.maximum(np.abs(b).max(-1), FP4_MAX * 2.0**-126) / np.float32(FP4_MAX))
    codes = (b / s[..., None]).astype(ml_dtypes.float4_e2m1fn).view(np.uint8).reshape(n_out, -1)
    codes = codes[:, : n_in + n_in % 2]
    return (codes[:, 0::2] | codes[:, 1::2] << 4).view(np.int8), s.astype(E8M0)


def quantize_fp8_ue8m0(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """V4's FP8 linears from fp32 [out, in]: (e4m3 [out, in], E8M0 [ceil(out / 128), ceil(in / 128)]), V3's
    recipe (``quantize_blocks``) with power-of-two scales."""
    q, s = quantize_blocks(jnp.asarray(w, jnp.float32), pow2=True)
    return np.asarray(q)[: w.shape[0], : w.shape[1]], np.asarray(s).astype(E8M0)


def _fp8_block(hf: dict) -> tuple[int, int] | None:
    """The weight block of a hub config's FP8 ``quantization_config`` (None: not quantized)."""
    q = hf.get("quantization_config")
    if q is None:
        return None
    if q.get("quant_method") != "fp8" or len(q.get("weight_block_size") or ()) != 2:
        raise CheckpointError(f"quantization_config {q}: only quant_method 'fp8' with a 2-d weight_block_size is read")
    return tuple(q["weight_block_size"])


def _without_absent_mtp(c: ModelConfig, sd: Mapping[str, np.ndarray], where: str) -> ModelConfig:
    """``c`` with num_nextn_predict_layers=0 (and a warning) if the checkpoint holds no MTP tensor at all."""
    prefix = mtp_prefix(c)
    if not c.num_nextn_predict_layers or any(n.startswith(prefix) for n in sd):
        return c
    warnings.warn(
        f"{where}: config.json says num_nextn_predict_layers={c.num_nextn_predict_layers}, but the checkpoint "
        f"holds no MTP tensors ({prefix}*; HF transformers drops them on save): loading without MTP "
        "(num_nextn_predict_layers=0)",
        stacklevel=4,
    )
    return c.replace(num_nextn_predict_layers=0)


def _open(path: str | os.PathLike, overrides: dict) -> tuple[ModelConfig, dict, tuple[int, int] | None]:
    """(config, memory-mapped tensors, FP8 block) of a checkpoint directory."""
    hf = json.loads((Path(path) / "config.json").read_text())
    if overrides.get("fp8_weights") and (hf.get("quantization_config") or {}).get("scale_fmt") == "ue8m0":
        overrides = {"fp8_scale_fmt": "ue8m0", **overrides}  # DeepSeek-V3.1 on: activation scales too
    sd = read_tensors(path)
    return _without_absent_mtp(from_hf_config(hf, **overrides), sd, os.fspath(path)), sd, _fp8_block(hf)


def load_hf(path: str | os.PathLike, **overrides) -> tuple[ModelConfig, dict]:
    """(config, variables) of a hub checkpoint directory, read tensor by tensor.

    ``overrides`` are ModelConfig fields, e.g. ``param_dtype="bfloat16"`` (default: config.json's dtype),
    ``scan_layers=False``. FP8 weights are dequantized to the param dtype, unless ``fp8_weights=True``:
    then the projections V3 quantizes stay e4m3 + 128x128 block scales (quantized here if the
    checkpoint holds them in another precision or block size). Raises CheckpointError naming
    every missing, unexpected and mis-shaped tensor; a checkpoint without any MTP tensor loads with
    num_nextn_predict_layers=0 and a warning.
    """
    cfg, sd, block = _open(path, overrides)
    return cfg, _assemble(cfg, sd, block)


def _hub_arrays(
    c: ModelConfig, variables: dict, release: bool = False
) -> list[tuple[str, Callable[[], np.ndarray], int]]:
    """(hub name, its array in hub layout when called, bytes) for every tensor a checkpoint of
    ``variables`` stores; FP8-stored leaves give the e4m3 weight and its ``_scale_inv``. ``release`` (V4):
    the FP8 release's form, each quantized weight followed by its ``.scale``."""
    table = hub_tensors(c)
    by_name = {t.name: t for t in table}
    kept = [(t.name, t) for t in table if not t.optional or np.any(np.asarray(leaf_at(variables, t.path)[t.index]))]
    out = []
    for name, t in kept + [(copy, by_name[shared]) for copy, shared in mtp_copies(c)]:
        leaf = leaf_at(variables, t.path)
        if t.fp8 and leaf.dtype != ml_dtypes.float8_e4m3fn:
            raise CheckpointError(
                f"{'/'.join(t.path)}: config says fp8_weights=True but the variables hold {leaf.dtype}"
            )
        if release and t.quant:
            out += _release_pair(c, t, lambda t=t: _hub_float(t, variables))
            continue
        dtype = np.dtype(np.int64) if t.ids else leaf.dtype  # the release's tid2eid is int64
        out.append(
            (
                name,
                lambda t=t, leaf=leaf, dtype=dtype: t.to_hub(np.asarray(leaf[t.index])).astype(dtype, copy=False),
                math.prod(t.hub_shape) * dtype.itemsize,
            )
        )
        if t.fp8:
            scale = leaf_at(variables, t.scale_path)
            out.append(
                (name + "_scale_inv", lambda t=t, s=scale: np.asarray(s[t.index]).T, math.prod(t.scale_shape) * 4)
            )
    return out


def _hub_float(t: HubTensor, variables: dict) -> np.ndarray:
    """A weight in hub layout, fp32 (an e4m3 leaf of ``fp8_weights`` times its block scales)."""
    a = t.to_hub(np.asarray(leaf_at(variables, t.path)[t.index]))
    if not t.fp8:
        return a.astype(np.float32)
    return dequantize_fp8(a, np.asarray(leaf_at(variables, t.scale_path)[t.index]).T, (FP8_BLOCK, FP8_BLOCK))


def _release_pair(c: ModelConfig, t: HubTensor, get: Callable[[], np.ndarray]) -> list:
    """``_hub_arrays``' entries of a weight in V4's release form and of its ``.scale``: the weight's getter
    quantizes (``quantize_fp4`` / ``quantize_fp8_ue8m0``) and keeps the scales until the next getter takes them."""
    fp4 = t.quant == "fp4"
    quantize = quantize_fp4 if fp4 else quantize_fp8_ue8m0
    shapes = t.fp4_shapes if fp4 else (t.hub_shape, tuple(block_count(n) for n in t.hub_shape))
    kept = []

    def weight() -> np.ndarray:
        kept.append(quantize(get()))
        return kept[-1][0]

    def scale() -> np.ndarray:
        return (kept.pop() if kept else quantize(get()))[1]

    return [(t.name, weight, math.prod(shapes[0])), (_scale_name(c, t), scale, math.prod(shapes[1]))]


def to_fp8_weights(cfg: ModelConfig, variables: dict) -> tuple[ModelConfig, dict]:
    """The same model for FP8 inference (``fp8_weights``): the projections V3 quantizes in e4m3 with
    128x128 block scales, quantized from ``variables`` (held twice meanwhile: for small models)."""
    if cfg.fp8_weights:
        return cfg, variables
    state_dict = {name: get() for name, get, _ in _hub_arrays(cfg, nn.meta.unbox(variables))}
    return cfg.replace(fp8_weights=True), from_hf_state_dict(cfg.replace(fp8_weights=True), state_dict)


def save_hf(
    path: str | os.PathLike,
    cfg: ModelConfig,
    variables: dict,
    *,
    fp8: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
) -> None:
    """Writes ``variables`` as a hub checkpoint directory: config.json, safetensors shards of at most
    ``max_shard_bytes`` (one ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` + index).

    ``fp8`` (or variables of ``fp8_weights``): as the FP8 release, quantized here if need be; V3's e4m3 +
    fp32 block scales (``to_fp8_weights``), V4's e4m3 linears and FP4 experts with E8M0 scales.

    Built in a temporary directory and renamed into place; an existing non-empty ``path`` is replaced
    only if ``overwrite``.
    """
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty (overwrite=True / --overwrite replaces it)")
    if fp8 and not cfg.is_v4:
        cfg, variables = to_fp8_weights(cfg, variables)
    release = cfg.is_v4 and (fp8 or cfg.fp8_weights)
    variables = nn.meta.unbox(variables)
    entries = _hub_arrays(cfg, variables, release)
    sizes = [n for _, _, n in entries]
    shards = shard_groups(sizes, max_shard_bytes)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(to_hf_config(cfg, fp8=release), indent=2) + "\n")
        weight_map = {}
        for file, shard in zip(names, shards):
            tensors = {}
            for i in shard:
                name, get, _ = entries[i]
                tensors[name] = np.ascontiguousarray(get())
                weight_map[name] = file
            save_file(tensors, tmp / file, metadata={"format": "pt"})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp: Path, path: Path) -> None:
    """Renames ``tmp`` to ``path``; an existing ``path`` is set aside first and deleted after."""
    if not path.exists():
        os.replace(tmp, path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
    os.replace(path, old / path.name)
    os.replace(tmp, path)
    shutil.rmtree(old)


def summary(path: str | os.PathLike) -> str:
    """A checkpoint directory checked against its config.json from the headers alone, described."""
    cfg, sd, block = _open(path, {})
    _check(cfg, hub_tensors(cfg), sd, block)
    by_dtype = Counter()
    for a in sd.values():
        by_dtype[a.dtype.name] += a.nbytes
    sizes = ", ".join(f"{d} {n / 1e6:,.1f} MB" for d, n in by_dtype.most_common())
    quant = "none"
    if block:
        fp4 = any(a.dtype == np.int8 for a in sd.values())  # V4's packed FP4 experts
        quant = f"FP8, {block[0]}x{block[1]} blocks{', FP4 experts, 1x32 blocks' if fp4 else ''}"
        quant += " (dequantized on load unless fp8_weights=True)"
    return f"{path}: ok, {_describe(cfg)}\n  {len(sd)} tensors: {sizes}\n  quantization: {quant}"
