"""Hub-format checkpoints (HF safetensors names, REFERENCE §6) <-> dsjax variables.

    cfg, variables = load_hf("path/to/DeepSeek-V3")        # config.json + *.safetensors -> Transformer(cfg)
    cfg, variables = load_hf(path, fp8_weights=True)        # FP8 inference: e4m3 weights + block scales kept
    save_hf("out/", cfg, variables)                          # the same format back
    variables = from_hf_state_dict(cfg, state_dict)         # hub-named arrays already in memory

``python -m dsjax.convert SRC`` checks a checkpoint against its config.json from the file headers alone
and prints a summary; ``python -m dsjax.convert SRC DST [--dtype bfloat16] [--fp8]`` re-exports it
(tokenizer and other non-weight files are copied along).

One table, ``_tensors(cfg)``, lists every hub tensor with its place in our variables; loading and saving
both walk it. HF linear weights are [out, in]; ours are [*in, *out] with heads split out, e.g. q_b_proj
[q_lora, heads, qk_head_dim]. Routed experts J = 0..E-1 are stacked into w_gate / w_up [E, H, I] and
w_down [E, I, H]; layers are stacked along a leading axis when ``cfg.scan_layers``. The MTP module d is
hub layer ``num_hidden_layers + d``; its ``embed_tokens`` and ``shared_head.head`` are copies of the
shared embedding and head: written on save, checked (not loaded) on load.

Files are memory-mapped and read tensor by tensor into the preallocated variables, so a checkpoint is
never held twice. The safetensors header is parsed here and the bytes viewed with ml_dtypes, because
safetensors' numpy API cannot return bfloat16 or float8 (its flax API no float8). FP8 releases
(``quantization_config.quant_method: fp8``) are dequantized, weight (e4m3) x weight_scale_inv per
128x128 block, to the param dtype; or, with ``fp8_weights=True`` (FP8 inference), kept as they are:
the e4m3 bytes and scales only transposed to our layout (other checkpoints are quantized on load, and
``to_fp8_weights`` quantizes variables in memory). Such variables export as an FP8 release again.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
import dataclasses
import json
import math
import mmap
import os
from pathlib import Path
import shutil
import sys
import tempfile
import warnings

import flax.linen as nn
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from dsjax.config import ModelConfig
from dsjax.fp8 import block_count
from pallas_kernels.quant import TILE as FP8_BLOCK
from pallas_kernels.quant import quantize_blocks


class CheckpointError(ValueError):
    """Tensors are missing, unexpected or mis-shaped; the message lists every one."""


# ---------------------------------------------------------------------------------------------
# The table: every hub tensor and where it lives in our variables.


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One hub tensor: its name, its place in our variables and how the two layouts differ."""

    name: str
    path: tuple[str, ...]  # ("params" | "selection_bias", *modules, leaf)
    index: tuple[int, ...]  # leading indices into that leaf: stacked layer, expert
    shape: tuple[int, ...]  # ours, below the index
    n_in: int | None = None  # a linear: ours [*in, *out] = shape split after n_in dims; hub [out, in]
    optional: bool = False  # absent <=> zeros (V2 checkpoints carry no correction bias)
    fp8: bool = False  # ours is e4m3 + a "<leaf>_scale_inv" leaf of 128x128 block scales (cfg.fp8_weights)

    @property
    def hub_shape(self) -> tuple[int, ...]:
        if self.n_in is None:
            return self.shape
        return math.prod(self.shape[self.n_in :]), math.prod(self.shape[: self.n_in])

    def to_ours(self, a: np.ndarray) -> np.ndarray:
        return a if self.n_in is None else a.T.reshape(self.shape)

    def to_hub(self, a: np.ndarray) -> np.ndarray:
        return a if self.n_in is None else a.reshape(self.hub_shape[::-1]).T

    @property
    def scale_path(self) -> tuple[str, ...]:
        return (*self.path[:-1], self.path[-1] + "_scale_inv")

    @property
    def scale_shape(self) -> tuple[int, int]:
        """Ours: one scale per 128x128 block of the 2-D view [K = prod(in), N = prod(out)] = hub^T."""
        return tuple(block_count(n) for n in self.hub_shape[::-1])


def _linear(hub: str, ours: tuple, index: tuple, name: str, in_dims: tuple, out_dims: tuple, fp8: bool) -> _Tensor:
    return _Tensor(f"{hub}{name}.weight", ("params", *ours, name, "kernel"), index, (*in_dims, *out_dims), len(in_dims),
                   fp8=fp8)  # fmt: skip


def _norm(hub: str, ours: tuple, index: tuple, name: str, dim: int, ours_name: str | None = None) -> _Tensor:
    return _Tensor(f"{hub}{name}.weight", ("params", *ours, ours_name or name, "scale"), index, (dim,))


def _attention(c: ModelConfig, hub: str, ours: tuple, index: tuple) -> list[_Tensor]:
    h, H, f8 = c.num_attention_heads, c.hidden_size, c.fp8_weights
    hub, ours = hub + "self_attn.", (*ours, "self_attn")
    if c.q_lora_rank is None:
        q = [_linear(hub, ours, index, "q_proj", (H,), (h, c.qk_head_dim), f8)]
    else:
        q = [
            _linear(hub, ours, index, "q_a_proj", (H,), (c.q_lora_rank,), f8),
            _norm(hub, ours, index, "q_a_layernorm", c.q_lora_rank),
            _linear(hub, ours, index, "q_b_proj", (c.q_lora_rank,), (h, c.qk_head_dim), f8),
        ]
    return q + [
        _linear(hub, ours, index, "kv_a_proj_with_mqa", (H,), (c.kv_lora_rank + c.qk_rope_head_dim,), f8),
        _norm(hub, ours, index, "kv_a_layernorm", c.kv_lora_rank),
        _linear(hub, ours, index, "kv_b_proj", (c.kv_lora_rank,), (h, c.qk_nope_head_dim + c.v_head_dim), f8),
        _linear(hub, ours, index, "o_proj", (h, c.v_head_dim), (H,), f8),
    ]


def _mlp(hub: str, ours: tuple, index: tuple, hidden: int, inter: int, fp8: bool) -> list[_Tensor]:
    return [
        _linear(hub, ours, index, "gate_proj", (hidden,), (inter,), fp8),
        _linear(hub, ours, index, "up_proj", (hidden,), (inter,), fp8),
        _linear(hub, ours, index, "down_proj", (inter,), (hidden,), fp8),
    ]


def _moe(c: ModelConfig, hub: str, ours: tuple, index: tuple) -> list[_Tensor]:
    H, I, E = c.hidden_size, c.moe_intermediate_size, c.n_routed_experts
    t = [_Tensor(hub + "gate.weight", ("params", *ours, "gate"), index, (H, E), 1)]
    experts = (("gate_proj", "w_gate", (H, I)), ("up_proj", "w_up", (H, I)), ("down_proj", "w_down", (I, H)))
    for j in range(E):
        for name, leaf, dims in experts:
            t.append(_Tensor(f"{hub}experts.{j}.{name}.weight", ("params", *ours, leaf), (*index, j), dims, 1,
                             fp8=c.fp8_weights))  # fmt: skip
    if c.n_shared_experts:
        t += _mlp(hub + "shared_experts.", (*ours, "shared_experts"), index, H, c.n_shared_experts * I, c.fp8_weights)
    bias = ("selection_bias", *ours, "e_score_correction_bias")
    return t + [_Tensor(hub + "gate.e_score_correction_bias", bias, index, (E,), optional=c.topk_method != "noaux_tc")]


def _block(c: ModelConfig, i: int, ours: tuple, index: tuple, moe: bool) -> list[_Tensor]:
    hub, H = f"model.layers.{i}.", c.hidden_size
    t = [_norm(hub, ours, index, "input_layernorm", H)] + _attention(c, hub, ours, index)
    t.append(_norm(hub, ours, index, "post_attention_layernorm", H))
    if moe:
        return t + _moe(c, hub + "mlp.", (*ours, "mlp"), index)
    return t + _mlp(hub + "mlp.", (*ours, "mlp"), index, H, c.intermediate_size, c.fp8_weights)


def _tensors(c: ModelConfig) -> list[_Tensor]:
    """Every hub tensor of a checkpoint for ``c`` (the MTP copies aside), with its place in our variables."""
    H, V, k = c.hidden_size, c.vocab_size, c.first_k_dense_replace
    t = [_Tensor("model.embed_tokens.weight", ("params", "embed_tokens", "embedding"), (), (V, H))]
    for i in range(c.num_hidden_layers):
        stack, j = ("dense_layers", i) if i < k else ("moe_layers", i - k)
        ours, index = ((stack, "layers"), (j,)) if c.scan_layers else ((stack, f"layer_{j}"), ())
        t += _block(c, i, ours, index, moe=i >= k)
    t.append(_norm("model.", (), (), "norm", H))
    if not c.tie_word_embeddings:
        t.append(_Tensor("lm_head.weight", ("params", "lm_head", "kernel"), (), (H, V), 1))
    for d in range(c.num_nextn_predict_layers):
        n, ours = c.num_hidden_layers + d, (f"mtp_{d}",)
        hub = f"model.layers.{n}."
        t += [
            _norm(hub, ours, (), "enorm", H),
            _norm(hub, ours, (), "hnorm", H),
            _linear(hub, ours, (), "eh_proj", (2 * H,), (H,), fp8=False),  # V3 keeps it unquantized
            _norm(hub, ours, (), "shared_head.norm", H, "shared_head_norm"),
        ]
        t += _block(c, n, (*ours, "block"), (), moe=True)
    return t


def _copies(c: ModelConfig) -> list[tuple[str, str]]:
    """(copy, shared) hub names: each MTP layer's embedding and output head, as the V3 release stores them."""
    head = "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
    layers = range(c.num_hidden_layers, c.num_hidden_layers + c.num_nextn_predict_layers)
    return [p for n in layers for p in ((f"model.layers.{n}.embed_tokens.weight", "model.embed_tokens.weight"),
                                        (f"model.layers.{n}.shared_head.head.weight", head))]  # fmt: skip


def _at(tree, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


# ---------------------------------------------------------------------------------------------
# Loading.


def from_hf_state_dict(cfg: ModelConfig, state_dict: Mapping[str, np.ndarray]) -> dict:
    """Hub-named tensors -> ``{"params", "selection_bias"}`` (numpy, params in cfg.param_dtype).

    Raises CheckpointError naming every missing, unexpected and mis-shaped tensor.
    """
    return _assemble(cfg, state_dict, None)


def _assemble(c: ModelConfig, sd: Mapping[str, np.ndarray], block: tuple[int, int] | None) -> dict:
    """Checks ``sd`` against the table, then copies it tensor by tensor into freshly allocated variables."""
    table = _tensors(c)
    _check(c, table, sd, block)
    variables = _allocate(table, jnp.dtype(c.param_dtype))
    for t in table:
        if t.name not in sd:
            continue
        a, scale = sd[t.name], sd.get(t.name + "_scale_inv") if block else None
        if t.fp8:
            q, s = _fp8_weight(t, a, scale, block, c.fp8_scale_fmt == "ue8m0")
            _at(variables, t.path)[t.index], _at(variables, t.scale_path)[t.index] = q, s
        else:
            _at(variables, t.path)[t.index] = t.to_ours(a if scale is None else dequantize_fp8(a, scale, block))
    return variables


def _fp8_weight(t: _Tensor, a: np.ndarray, scale: np.ndarray | None, block, pow2: bool) -> tuple[np.ndarray, np.ndarray]:
    """(e4m3 [ours], scale_inv [K/128, N/128]) for an FP8-stored leaf: the release's own bytes when it
    ships e4m3 in 128x128 blocks (only transposed), else quantized here (V3's recipe, ``quantize_blocks``;
    ``pow2``: UE8M0 scales)."""
    if scale is not None and a.dtype == ml_dtypes.float8_e4m3fn and tuple(block) == (FP8_BLOCK, FP8_BLOCK):
        return t.to_ours(a), np.asarray(scale, np.float32).T
    w = a if scale is None else dequantize_fp8(a, scale, block)
    k, n = t.hub_shape[::-1]
    q, s = quantize_blocks(jnp.asarray(t.to_ours(w), jnp.float32).reshape(k, n), pow2)
    return np.asarray(q)[:k, :n].reshape(t.shape), np.asarray(s)


def _allocate(table: list[_Tensor], param_dtype: np.dtype) -> dict:
    """Zeroed variables for every leaf the table names: params in param_dtype (FP8-stored ones e4m3,
    with their fp32 scale_inv leaves), selection_bias fp32."""
    leaves: dict[tuple, list[_Tensor]] = {}
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
            put(path, (*lead, *t.shape), param_dtype if path[0] == "params" else np.float32)
    return variables


def _check(c: ModelConfig, table: list[_Tensor], sd: Mapping[str, np.ndarray], block: tuple[int, int] | None) -> None:
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
        expect(t.name, t.hub_shape, t.optional)
        if block and t.name in sd and (sd[t.name].dtype == ml_dtypes.float8_e4m3fn or t.name + "_scale_inv" in sd):
            expect(t.name + "_scale_inv", tuple(-(-n // b) for n, b in zip(t.hub_shape, block)))
    for copy, shared in _copies(c):
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
        if c.num_nextn_predict_layers and not any(n.startswith(f"model.layers.{c.num_hidden_layers}.") for n in sd):
            lines.append("  (no MTP tensors: set num_nextn_predict_layers=0 to load without MTP, as load_hf does)")
        raise CheckpointError("\n".join(lines))


def _describe(c: ModelConfig) -> str:
    return (
        f"config ({c.num_hidden_layers} layers, {c.first_k_dense_replace} dense, {c.n_routed_experts} experts, "
        f"q_lora_rank={c.q_lora_rank}, {c.num_nextn_predict_layers} MTP)"
    )


def dequantize_fp8(w: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """fp32 W = W_fp8 * scale_inv of its (block[0] x block[1]) block; ragged edge blocks are cropped."""
    s = np.repeat(np.repeat(np.asarray(scale_inv, np.float32), block[0], 0), block[1], 1)
    return w.astype(np.float32) * s[: w.shape[0], : w.shape[1]]


_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip


def _memmap(file: Path) -> dict[str, np.ndarray]:
    """A safetensors file's tensors as read-only views of its memory map (no bytes are read yet)."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    header.pop("__metadata__", None)
    out = {}
    for name, h in header.items():
        if h["dtype"] not in _DTYPES:
            raise CheckpointError(f"{file}: {name} has dtype {h['dtype']}, which dsjax does not read")
        dtype, (start, end) = np.dtype(_DTYPES[h["dtype"]]), h["data_offsets"]
        a = np.frombuffer(buf, dtype, count=(end - start) // dtype.itemsize, offset=8 + n + start)
        out[name] = a.reshape(h["shape"])
    return out


def _open_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint directory (``model.safetensors.index.json``'s shards, or every
    ``*.safetensors``), by hub name, as memory-mapped views."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        absent = [f for f in files if not (path / f).is_file()]
        if absent:
            raise CheckpointError(f"{index} names shard files that do not exist: {', '.join(absent)}")
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        part = _memmap(path / f)
        if twice := sorted(set(part) & set(tensors)):
            raise CheckpointError(f"{path / f}: tensors also stored in another shard: {', '.join(twice)}")
        tensors.update(part)
    return tensors


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
    prefix = f"model.layers.{c.num_hidden_layers}."
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
    sd = _open_safetensors(path)
    return _without_absent_mtp(ModelConfig.from_hf(hf, **overrides), sd, os.fspath(path)), sd, _fp8_block(hf)


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


# ---------------------------------------------------------------------------------------------
# Saving.


def _hub_arrays(c: ModelConfig, variables: dict) -> list[tuple[str, Callable[[], np.ndarray], int]]:
    """(hub name, its array in hub layout when called, bytes) for every tensor a checkpoint of
    ``variables`` stores; FP8-stored leaves give the e4m3 weight and its ``_scale_inv``."""
    table = _tensors(c)
    by_name = {t.name: t for t in table}
    kept = [(t.name, t) for t in table if not t.optional or np.any(np.asarray(_at(variables, t.path)[t.index]))]
    out = []
    for name, t in kept + [(copy, by_name[shared]) for copy, shared in _copies(c)]:
        leaf = _at(variables, t.path)
        if t.fp8 and leaf.dtype != ml_dtypes.float8_e4m3fn:
            raise CheckpointError(f"{'/'.join(t.path)}: config says fp8_weights=True but the variables hold {leaf.dtype}")
        out.append((name, lambda t=t, leaf=leaf: t.to_hub(np.asarray(leaf[t.index])), math.prod(t.hub_shape) * leaf.dtype.itemsize))
        if t.fp8:
            scale = _at(variables, t.scale_path)
            out.append((name + "_scale_inv", lambda t=t, s=scale: np.asarray(s[t.index]).T, math.prod(t.scale_shape) * 4))
    return out


def to_fp8_weights(cfg: ModelConfig, variables: dict) -> tuple[ModelConfig, dict]:
    """The same model for FP8 inference (``fp8_weights``): the projections V3 quantizes in e4m3 with
    128x128 block scales, quantized from ``variables`` (held twice meanwhile: for small models)."""
    if cfg.fp8_weights:
        return cfg, variables
    state_dict = {name: get() for name, get, _ in _hub_arrays(cfg, nn.meta.unbox(variables))}
    return cfg.replace(fp8_weights=True), from_hf_state_dict(cfg.replace(fp8_weights=True), state_dict)


def _shards(sizes: list[int], max_bytes: int) -> list[list[int]]:
    """Consecutive groups of tensor indices, each at most ``max_bytes`` (unless one tensor alone is larger)."""
    shards, total = [[]], 0
    for i, n in enumerate(sizes):
        if shards[-1] and total + n > max_bytes:
            shards.append([])
            total = 0
        shards[-1].append(i)
        total += n
    return shards


def save_hf(path: str | os.PathLike, cfg: ModelConfig, variables: dict, *, max_shard_bytes: int = 5 * 2**30,
            overwrite: bool = False) -> None:  # fmt: skip
    """Writes ``variables`` as a hub checkpoint directory: config.json, safetensors shards of at most
    ``max_shard_bytes`` (one ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` + index).

    Built in a temporary directory and renamed into place; an existing non-empty ``path`` is replaced
    only if ``overwrite``.
    """
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty (overwrite=True / --overwrite replaces it)")
    variables = nn.meta.unbox(variables)
    entries = _hub_arrays(cfg, variables)
    sizes = [n for _, _, n in entries]
    shards = _shards(sizes, max_shard_bytes)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]  # fmt: skip

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2) + "\n")
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


# ---------------------------------------------------------------------------------------------
# CLI.


def summary(path: str | os.PathLike) -> str:
    """A checkpoint directory checked against its config.json from the headers alone, described."""
    cfg, sd, block = _open(path, {})
    _check(cfg, _tensors(cfg), sd, block)
    by_dtype = Counter()
    for a in sd.values():
        by_dtype[a.dtype.name] += a.nbytes
    sizes = ", ".join(f"{d} {n / 1e6:,.1f} MB" for d, n in by_dtype.most_common())
    quant = f"FP8, {block[0]}x{block[1]} blocks (dequantized on load unless fp8_weights=True)" if block else "none"
    return f"{path}: ok, {_describe(cfg)}\n  {len(sd)} tensors: {sizes}\n  quantization: {quant}"


def _main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m dsjax.convert", description=__doc__.split("\n")[0])
    ap.add_argument("src", help="hub checkpoint directory (config.json + *.safetensors)")
    ap.add_argument("dst", nargs="?", help="write the re-exported checkpoint here (omit: check SRC and summarise)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="param dtype to write (default: SRC's)")
    ap.add_argument("--fp8", action="store_true",
                    help="write V3's FP8 layout: e4m3 projections + 128x128 weight_scale_inv (kept from an FP8 SRC, else quantized)")
    ap.add_argument("--max-shard-gib", type=float, default=5.0)
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    a = ap.parse_args(argv)
    try:
        if a.dst is None:
            print(summary(a.src))
            return 0
        cfg, variables = load_hf(a.src, **({"param_dtype": a.dtype} if a.dtype else {}), fp8_weights=a.fp8)
        save_hf(a.dst, cfg, variables, max_shard_bytes=int(a.max_shard_gib * 2**30), overwrite=a.overwrite)
    except (CheckpointError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Tokenizer, generation config & co. travel along; weights and config.json were just written.
    for f in Path(a.src).iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(f, Path(a.dst) / f.name)
    print(summary(a.dst))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
