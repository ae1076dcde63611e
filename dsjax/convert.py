"""Hub-format (HF safetensors names, REFERENCE §6) tensors <-> dsjax variables.

``from_hf_state_dict(cfg, state_dict)`` maps ``model.layers.N.self_attn.q_b_proj.weight`` & co.
to ``{"params": ..., "selection_bias": ...}`` for ``Transformer(cfg)``. HF linear weights are
[out, in]; ours are [*in, *out] with heads split out, e.g. q_b_proj [q_lora, heads, qk_head_dim].
Routed experts J = 0..E-1 are stacked into w_gate / w_up [E, H, I] and w_down [E, I, H]; layers
are stacked along a leading axis when ``cfg.scan_layers``. The MTP module d is hub layer
``num_hidden_layers + d``; its ``embed_tokens`` and ``shared_head.head`` are copies of the shared
embedding and head and are checked, not loaded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.config import ModelConfig


class CheckpointError(ValueError):
    """Tensors are missing, unexpected or mis-shaped; the message lists every one."""


class _Reader:
    """Takes tensors from a state dict by hub name, recording what is missing or mis-shaped."""

    def __init__(self, state_dict: Mapping[str, np.ndarray]):
        self.sd = state_dict
        self.taken: set[str] = set()
        self.missing: list[str] = []
        self.misshaped: list[str] = []

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.sd:
            self.missing.append(name)
            return np.zeros(shape, np.float32)
        self.taken.add(name)
        a = np.asarray(self.sd[name])
        if a.shape != tuple(shape):
            self.misshaped.append(f"{name}: expected {tuple(shape)}, got {a.shape}")
            return np.zeros(shape, np.float32)
        return a

    def linear(self, name: str, in_dims: tuple[int, ...], out_dims: tuple[int, ...]) -> dict:
        """HF [prod(out), prod(in)] -> ours [*in_dims, *out_dims]."""
        w = self.get(name + ".weight", (math.prod(out_dims), math.prod(in_dims)))
        return {"kernel": w.T.reshape(*in_dims, *out_dims)}

    def norm(self, name: str, dim: int) -> dict:
        return {"scale": self.get(name + ".weight", (dim,))}


def _attention(r: _Reader, p: str, c: ModelConfig) -> dict:
    h, H = c.num_attention_heads, c.hidden_size
    a = {}
    if c.q_lora_rank is None:
        a["q_proj"] = r.linear(p + "q_proj", (H,), (h, c.qk_head_dim))
    else:
        a["q_a_proj"] = r.linear(p + "q_a_proj", (H,), (c.q_lora_rank,))
        a["q_a_layernorm"] = r.norm(p + "q_a_layernorm", c.q_lora_rank)
        a["q_b_proj"] = r.linear(p + "q_b_proj", (c.q_lora_rank,), (h, c.qk_head_dim))
    a["kv_a_proj_with_mqa"] = r.linear(p + "kv_a_proj_with_mqa", (H,), (c.kv_lora_rank + c.qk_rope_head_dim,))
    a["kv_a_layernorm"] = r.norm(p + "kv_a_layernorm", c.kv_lora_rank)
    a["kv_b_proj"] = r.linear(p + "kv_b_proj", (c.kv_lora_rank,), (h, c.qk_nope_head_dim + c.v_head_dim))
    a["o_proj"] = r.linear(p + "o_proj", (h, c.v_head_dim), (H,))
    return a


def _mlp(r: _Reader, p: str, hidden: int, inter: int) -> dict:
    return {
        "gate_proj": r.linear(p + "gate_proj", (hidden,), (inter,)),
        "up_proj": r.linear(p + "up_proj", (hidden,), (inter,)),
        "down_proj": r.linear(p + "down_proj", (inter,), (hidden,)),
    }


def _moe(r: _Reader, p: str, c: ModelConfig) -> tuple[dict, dict]:
    H, I, E = c.hidden_size, c.moe_intermediate_size, c.n_routed_experts
    ex = [_mlp(r, f"{p}experts.{j}.", H, I) for j in range(E)]
    params = {
        "gate": r.get(p + "gate.weight", (E, H)).T,
        "w_gate": np.stack([e["gate_proj"]["kernel"] for e in ex]),
        "w_up": np.stack([e["up_proj"]["kernel"] for e in ex]),
        "w_down": np.stack([e["down_proj"]["kernel"] for e in ex]),
    }
    if c.n_shared_experts:
        params["shared_experts"] = _mlp(r, p + "shared_experts.", H, c.n_shared_experts * I)
    # V2 (softmax) checkpoints carry no correction bias: it starts at zero.
    bias_name = p + "gate.e_score_correction_bias"
    if c.topk_method == "noaux_tc" or bias_name in r.sd:
        bias = r.get(bias_name, (E,)).astype(np.float32)
    else:
        bias = np.zeros((E,), np.float32)
    return params, {"e_score_correction_bias": bias}


def _block(r: _Reader, i: int, c: ModelConfig, moe: bool) -> tuple[dict, dict]:
    p = f"model.layers.{i}."
    params = {
        "input_layernorm": r.norm(p + "input_layernorm", c.hidden_size),
        "post_attention_layernorm": r.norm(p + "post_attention_layernorm", c.hidden_size),
        "self_attn": _attention(r, p + "self_attn.", c),
    }
    bias = {}
    if moe:
        params["mlp"], bias["mlp"] = _moe(r, p + "mlp.", c)
    else:
        params["mlp"] = _mlp(r, p + "mlp.", c.hidden_size, c.intermediate_size)
    return params, bias


def _stack(blocks: list[dict], scan: bool) -> dict:
    if scan:
        return {"layers": jax.tree.map(lambda *a: np.stack(a), *blocks)}
    return {f"layer_{i}": b for i, b in enumerate(blocks)}


def from_hf_state_dict(cfg: ModelConfig, state_dict: Mapping[str, np.ndarray]) -> dict:
    """Hub-named tensors -> ``{"params", "selection_bias"}`` (numpy, cast to cfg.param_dtype).

    Raises CheckpointError naming every missing, unexpected and mis-shaped tensor.
    """
    c = cfg
    r = _Reader(state_dict)
    V, H = c.vocab_size, c.hidden_size
    params: dict = {"embed_tokens": {"embedding": r.get("model.embed_tokens.weight", (V, H))}}
    bias: dict = {}
    k = c.first_k_dense_replace
    if k:
        params["dense_layers"] = _stack([_block(r, i, c, False)[0] for i in range(k)], c.scan_layers)
    if c.num_moe_layers:
        blocks = [_block(r, i, c, True) for i in range(k, c.num_hidden_layers)]
        params["moe_layers"] = _stack([b[0] for b in blocks], c.scan_layers)
        bias["moe_layers"] = _stack([b[1] for b in blocks], c.scan_layers)
    params["norm"] = r.norm("model.norm", H)
    if not c.tie_word_embeddings:
        params["lm_head"] = {"kernel": r.get("lm_head.weight", (V, H)).T}

    for d in range(c.num_nextn_predict_layers):
        n = c.num_hidden_layers + d
        p = f"model.layers.{n}."
        block, block_bias = _block(r, n, c, True)
        params[f"mtp_{d}"] = {
            "enorm": r.norm(p + "enorm", H),
            "hnorm": r.norm(p + "hnorm", H),
            "eh_proj": r.linear(p + "eh_proj", (2 * H,), (H,)),
            "shared_head_norm": r.norm(p + "shared_head.norm", H),
            "block": block,
        }
        bias[f"mtp_{d}"] = {"block": block_bias}
        _check_shared_copy(r, p + "embed_tokens.weight", "model.embed_tokens.weight")
        _check_shared_copy(r, p + "shared_head.head.weight", "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight")

    unexpected = sorted(set(state_dict) - r.taken)
    if r.missing or r.misshaped or unexpected:
        lines = [f"checkpoint does not match {_describe(c)}:"]
        lines += [f"  missing: {n}" for n in r.missing]
        lines += [f"  mis-shaped: {n}" for n in r.misshaped]
        lines += [f"  unexpected: {n}" for n in unexpected]
        if c.num_nextn_predict_layers and any(f"layers.{c.num_hidden_layers}." in n for n in r.missing):
            lines.append("  (no MTP tensors? set num_nextn_predict_layers=0 to load without MTP)")
        raise CheckpointError("\n".join(lines))
    dtype = jnp.dtype(c.param_dtype)
    return {"params": jax.tree.map(lambda a: np.asarray(a, dtype), params), "selection_bias": bias}


def _check_shared_copy(r: _Reader, name: str, shared: str) -> None:
    """MTP's embedding/head copies must equal the shared tensors (if present)."""
    if name not in r.sd:
        return
    r.taken.add(name)
    if shared in r.sd and not np.array_equal(np.asarray(r.sd[name]), np.asarray(r.sd[shared])):
        r.misshaped.append(f"{name}: differs from {shared}, but dsjax shares embedding and head with MTP")


def _describe(c: ModelConfig) -> str:
    return (
        f"config ({c.num_hidden_layers} layers, {c.first_k_dense_replace} dense, {c.n_routed_experts} experts, "
        f"q_lora_rank={c.q_lora_rank}, {c.num_nextn_predict_layers} MTP)"
    )
