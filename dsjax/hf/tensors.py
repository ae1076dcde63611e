"""The table of a hub checkpoint's tensors: every HF safetensors name and its place in our variables.

Loading and saving both walk ``hub_tensors(cfg)``. HF linear weights are [out, in]; ours are
[*in, *out] with heads split out, e.g. q_b_proj [q_lora, heads, qk_head_dim]. Routed experts
J = 0..E-1 are stacked into w_gate / w_up [E, H, I] and w_down [E, I, H]; layers are stacked along
a leading axis when ``cfg.scan_layers``. The MTP module d is hub layer ``num_hidden_layers + d``; its
``embed_tokens`` and ``shared_head.head`` are copies of the shared embedding and head
(``mtp_copies``): written on save, checked (not loaded) on load. V3.2 (``cfg.index_topk > 0``) adds
each layer's DSA indexer (the MTP layers' too), ``self_attn.indexer.{wq_b, wk, k_norm, weights_proj}``:
wq_b [q_lora, index heads, index_head_dim], k_norm a LayerNorm (``scale`` and ``bias``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from dsjax.config import ModelConfig
from pallas_kernels.quant import block_count


class CheckpointError(ValueError):
    """Tensors are missing, unexpected or mis-shaped; the message lists every one."""


@dataclasses.dataclass(frozen=True)
class HubTensor:
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


def _linear(hub: str, ours: tuple, index: tuple, name: str, in_dims: tuple, out_dims: tuple, fp8: bool) -> HubTensor:
    return HubTensor(
        f"{hub}{name}.weight", ("params", *ours, name, "kernel"), index, (*in_dims, *out_dims), len(in_dims), fp8=fp8
    )


def _norm(hub: str, ours: tuple, index: tuple, name: str, dim: int, ours_name: str | None = None) -> HubTensor:
    return HubTensor(f"{hub}{name}.weight", ("params", *ours, ours_name or name, "scale"), index, (dim,))


def _attention(c: ModelConfig, hub: str, ours: tuple, index: tuple) -> list[HubTensor]:
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
    return (
        q
        + [
            _linear(hub, ours, index, "kv_a_proj_with_mqa", (H,), (c.kv_lora_rank + c.qk_rope_head_dim,), f8),
            _norm(hub, ours, index, "kv_a_layernorm", c.kv_lora_rank),
            _linear(hub, ours, index, "kv_b_proj", (c.kv_lora_rank,), (h, c.qk_nope_head_dim + c.v_head_dim), f8),
            _linear(hub, ours, index, "o_proj", (h, c.v_head_dim), (H,), f8),
        ]
        + (_indexer(c, hub + "indexer.", (*ours, "indexer"), index) if c.index_topk else [])
    )


def _indexer(c: ModelConfig, hub: str, ours: tuple, index: tuple) -> list[HubTensor]:
    """V3.2's DSA indexer: wq_b and wk are FP8 in the FP8 release; weights_proj and the LayerNorm k_norm are not."""
    H, n, d, f8 = c.hidden_size, c.index_n_heads, c.index_head_dim, c.fp8_weights
    return [
        _linear(hub, ours, index, "wq_b", (c.q_lora_rank,), (n, d), f8),
        _linear(hub, ours, index, "wk", (H,), (d,), f8),
        _norm(hub, ours, index, "k_norm", d),
        HubTensor(f"{hub}k_norm.bias", ("params", *ours, "k_norm", "bias"), index, (d,)),
        _linear(hub, ours, index, "weights_proj", (H,), (n,), fp8=False),
    ]


def _mlp(hub: str, ours: tuple, index: tuple, hidden: int, inter: int, fp8: bool) -> list[HubTensor]:
    return [
        _linear(hub, ours, index, "gate_proj", (hidden,), (inter,), fp8),
        _linear(hub, ours, index, "up_proj", (hidden,), (inter,), fp8),
        _linear(hub, ours, index, "down_proj", (inter,), (hidden,), fp8),
    ]


def _moe(c: ModelConfig, hub: str, ours: tuple, index: tuple) -> list[HubTensor]:
    H, I, E = c.hidden_size, c.moe_intermediate_size, c.n_routed_experts
    t = [HubTensor(hub + "gate.weight", ("params", *ours, "gate"), index, (H, E), 1)]
    experts = (("gate_proj", "w_gate", (H, I)), ("up_proj", "w_up", (H, I)), ("down_proj", "w_down", (I, H)))
    for j in range(E):
        for name, leaf, dims in experts:
            t.append(
                HubTensor(
                    f"{hub}experts.{j}.{name}.weight", ("params", *ours, leaf), (*index, j), dims, 1, fp8=c.fp8_weights
                )
            )
    if c.n_shared_experts:
        t += _mlp(hub + "shared_experts.", (*ours, "shared_experts"), index, H, c.n_shared_experts * I, c.fp8_weights)
    bias = ("selection_bias", *ours, "e_score_correction_bias")
    return t + [
        HubTensor(hub + "gate.e_score_correction_bias", bias, index, (E,), optional=c.topk_method != "noaux_tc")
    ]


def _block(c: ModelConfig, i: int, ours: tuple, index: tuple, moe: bool) -> list[HubTensor]:
    hub, H = f"model.layers.{i}.", c.hidden_size
    t = [_norm(hub, ours, index, "input_layernorm", H)] + _attention(c, hub, ours, index)
    t.append(_norm(hub, ours, index, "post_attention_layernorm", H))
    if moe:
        return t + _moe(c, hub + "mlp.", (*ours, "mlp"), index)
    return t + _mlp(hub + "mlp.", (*ours, "mlp"), index, H, c.intermediate_size, c.fp8_weights)


def hub_tensors(c: ModelConfig) -> list[HubTensor]:
    """Every hub tensor of a checkpoint for ``c`` (the MTP copies aside), with its place in our variables."""
    H, V, k = c.hidden_size, c.vocab_size, c.first_k_dense_replace
    t = [HubTensor("model.embed_tokens.weight", ("params", "embed_tokens", "embedding"), (), (V, H))]
    for i in range(c.num_hidden_layers):
        stack, j = ("dense_layers", i) if i < k else ("moe_layers", i - k)
        ours, index = ((stack, "layers"), (j,)) if c.scan_layers else ((stack, f"layer_{j}"), ())
        t += _block(c, i, ours, index, moe=i >= k)
    t.append(_norm("model.", (), (), "norm", H))
    if not c.tie_word_embeddings:
        t.append(HubTensor("lm_head.weight", ("params", "lm_head", "kernel"), (), (H, V), 1))
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


def mtp_copies(c: ModelConfig) -> list[tuple[str, str]]:
    """(copy, shared) hub names: each MTP layer's embedding and output head, as the V3 release stores them."""
    head = "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
    layers = range(c.num_hidden_layers, c.num_hidden_layers + c.num_nextn_predict_layers)
    return [
        p
        for n in layers
        for p in (
            (f"model.layers.{n}.embed_tokens.weight", "model.embed_tokens.weight"),
            (f"model.layers.{n}.shared_head.head.weight", head),
        )
    ]


def leaf_at(tree, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree
