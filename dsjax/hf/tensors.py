"""The table of a hub checkpoint's tensors: every HF safetensors name and its place in our variables.

Loading and saving both walk ``hub_tensors(cfg)``. HF linear weights are [out, in]; ours are
[*in, *out] with heads split out, e.g. q_b_proj [q_lora, heads, qk_head_dim]. Routed experts
J = 0..E-1 are stacked into w_gate / w_up [E, H, I] and w_down [E, I, H]; layers are stacked along
a leading axis when ``cfg.scan_layers``. The MTP module d is hub layer ``num_hidden_layers + d``; its
``embed_tokens`` and ``shared_head.head`` are copies of the shared embedding and head
(``mtp_copies``): written on save, checked (not loaded) on load. V3.2 (``cfg.index_topk > 0``) adds
each layer's DSA indexer (the MTP layers' too), ``self_attn.indexer.{wq_b, wk, k_norm, weights_proj}``:
wq_b [q_lora, index heads, index_head_dim], k_norm a LayerNorm (``scale`` and ``bias``).

DeepSeek-V4 (``cfg.is_v4``) uses the release's own names (DeepSeek-V4-Flash's safetensors, no ``model.``
prefix; transformers' conversion_mapping "deepseek_v4" renames from them): ``embed``, ``head``, ``norm``,
``hc_head_*``, ``layers.N.*`` and the MTP modules ``mtp.D.*`` (no embedding / head copies). Its layers sit
in ``dsjax.model.v4_block.layer_plan``'s runs, a scanned run's leaves with a leading repeat axis. The release
ships the linears FP8 and the routed experts FP4 (``HubTensor.quant``, ``dsjax.hf.checkpoint``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from dsjax.config import ModelConfig
from dsjax.model.hybrid_attention import CSA, SLIDING
from dsjax.model.v4_block import layer_plan
from pallas_kernels.quant import block_count

FP4_BLOCK = 32  # V4's routed experts: one E8M0 scale per 32 consecutive inputs (release inference/model.py)


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
    # How V4's FP8 release stores it: "fp8" e4m3 + E8M0 scales per 128x128 block, "fp4" packed e2m1 +
    # E8M0 scales per 1x32 block, both in a sibling "<module>.scale"; None: unquantized
    quant: str | None = None
    grouped: bool = False  # V4's wo_a: ours [groups, in, out], hub [groups * out, in]
    ids: bool = False  # an integer table (V4's tid2eid): int32 ours, int64 in the release
    fp32: bool = False  # fp32 whatever the param dtype (V4's mHC, attention sinks, ape; as the release keeps them)

    @property
    def hub_shape(self) -> tuple[int, ...]:
        if self.grouped:
            g, n_in, n_out = self.shape
            return g * n_out, n_in
        if self.n_in is None:
            return self.shape
        return math.prod(self.shape[self.n_in :]), math.prod(self.shape[: self.n_in])

    @property
    def fp4_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(packed weight, scale) shapes of the release's FP4 form: two e2m1 per byte, a scale per 32 inputs."""
        n_out, n_in = self.hub_shape
        return (n_out, -(-n_in // 2)), (n_out, -(-n_in // FP4_BLOCK))

    def to_ours(self, a: np.ndarray) -> np.ndarray:
        if self.grouped:
            return a.reshape(self.shape[0], self.shape[2], self.shape[1]).transpose(0, 2, 1)
        return a if self.n_in is None else a.T.reshape(self.shape)

    def to_hub(self, a: np.ndarray) -> np.ndarray:
        if self.grouped:
            return a.transpose(0, 2, 1).reshape(self.hub_shape)
        return a if self.n_in is None else a.reshape(self.hub_shape[::-1]).T

    @property
    def scale_path(self) -> tuple[str, ...]:
        return (*self.path[:-1], self.path[-1] + "_scale_inv")

    @property
    def scale_shape(self) -> tuple[int, int]:
        """Ours: one scale per 128x128 block of the 2-D view [K = prod(in), N = prod(out)] = hub^T."""
        return tuple(block_count(n) for n in self.hub_shape[::-1])


def _linear(
    hub: str, ours: tuple, index: tuple, name: str, in_dims: tuple, out_dims: tuple, fp8: bool, quant: str | None = None
) -> HubTensor:
    return HubTensor(
        f"{hub}{name}.weight",
        ("params", *ours, name, "kernel"),
        index,
        (*in_dims, *out_dims),
        len(in_dims),
        fp8=fp8,
        quant=quant,
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
    if c.is_v4:
        return _v4_tensors(c)
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


def _hc(c: ModelConfig, hub: str, ours: tuple, index: tuple, name: str, head: bool = False) -> list[HubTensor]:
    """An mHC mixer, ``{name}_{fn,base,scale}`` (the same layout both sides): fn [mix, hc_mult * H], base
    [mix], scale [3]; mix = (2 + n) n for a block's (pre, post, comb), n with a single scale for a head."""
    n = c.hc_mult
    mix = n if head else (2 + n) * n
    shapes = {"fn": (mix, n * c.hidden_size), "base": (mix,), "scale": (1 if head else 3,)}
    return [
        HubTensor(f"{hub}{name}_{leaf}", ("params", *ours, name, leaf), index, s, fp32=True)
        for leaf, s in shapes.items()
    ]


def _compressor(hub: str, ours: tuple, index: tuple, H: int, rate: int, d: int, overlap: bool) -> list[HubTensor]:
    """A V4 KV compressor over ``rate`` tokens; the overlapping one (CSA's) has two d-wide branches."""
    width = 2 * d if overlap else d
    return [
        _linear(hub, ours, index, "wkv", (H,), (width,), fp8=False),
        _linear(hub, ours, index, "wgate", (H,), (width,), fp8=False),
        HubTensor(hub + "ape", ("params", *ours, "ape"), index, (rate, width), fp32=True),
        _norm(hub, ours, index, "norm", d),
    ]


def _v4_attention(c: ModelConfig, hub: str, ours: tuple, index: tuple, layer_type: str) -> list[HubTensor]:
    """``attn.*``: LoRA queries, one shared K=V head, grouped output projection; a compressor (CSA, HCA)
    and CSA's indexer. FP8 in the release: wq_a, wq_b, wkv, wo_a, wo_b, indexer.wq_b."""
    H, h, d, g, f8 = c.hidden_size, c.num_attention_heads, c.head_dim, c.o_groups, c.fp8_weights
    hub, ours = hub + "attn.", (*ours, "attn")
    t = [
        HubTensor(hub + "attn_sink", ("params", *ours, "attn_sink"), index, (h,), fp32=True),
        _linear(hub, ours, index, "wq_a", (H,), (c.q_lora_rank,), f8, "fp8"),
        _norm(hub, ours, index, "q_norm", c.q_lora_rank),
        _linear(hub, ours, index, "wq_b", (c.q_lora_rank,), (h, d), f8, "fp8"),
        _linear(hub, ours, index, "wkv", (H,), (d,), f8, "fp8"),
        _norm(hub, ours, index, "kv_norm", d),
        HubTensor(
            hub + "wo_a.weight",
            ("params", *ours, "wo_a"),
            index,
            (g, h * d // g, c.o_lora_rank),
            quant="fp8",
            grouped=True,
        ),
        _linear(hub, ours, index, "wo_b", (g * c.o_lora_rank,), (H,), f8, "fp8"),
    ]
    if layer_type == SLIDING:
        return t
    rate = c.compress_rate_csa if layer_type == CSA else c.compress_rate_hca
    t += _compressor(hub + "compressor.", (*ours, "compressor"), index, H, rate, d, overlap=layer_type == CSA)
    if layer_type != CSA:
        return t
    n, di = c.index_n_heads, c.index_head_dim
    hub, ours = hub + "indexer.", (*ours, "indexer")
    return t + [
        _linear(hub, ours, index, "wq_b", (c.q_lora_rank,), (n, di), f8, "fp8"),
        _linear(hub, ours, index, "weights_proj", (H,), (n,), fp8=False),
        *_compressor(hub + "compressor.", (*ours, "compressor"), index, H, c.compress_rate_csa, di, overlap=True),
    ]


def _v4_moe(c: ModelConfig, hub: str, ours: tuple, index: tuple, hashed: bool) -> list[HubTensor]:
    """``ffn.*``: the router's gate.weight with gate.bias (learned routing; our correction bias) or gate.tid2eid
    (hash routing); experts.J.{w1 gate, w3 up, w2 down} (FP4 in the release), shared_experts.* (FP8)."""
    H, I, E, f8 = c.hidden_size, c.moe_intermediate_size, c.n_routed_experts, c.fp8_weights
    t = [HubTensor(hub + "gate.weight", ("params", *ours, "gate"), index, (H, E), 1)]
    # (hub name, our routed-expert leaf, our shared-expert module, [in, out] of a routed one)
    swiglu = (
        ("w1", "w_gate", "gate_proj", (H, I)),
        ("w3", "w_up", "up_proj", (H, I)),
        ("w2", "w_down", "down_proj", (I, H)),
    )
    for j in range(E):
        for name, leaf, _, dims in swiglu:
            t.append(
                HubTensor(
                    f"{hub}experts.{j}.{name}.weight",
                    ("params", *ours, leaf),
                    (*index, j),
                    dims,
                    1,
                    fp8=f8,
                    quant="fp4",
                )
            )
    n, shared = c.n_shared_experts, (*ours, "shared_experts")  # the shared experts: one MLP n times as wide
    for name, _, module, (a, b) in swiglu:
        dims = (a * n, b) if module == "down_proj" else (a, b * n)
        path = ("params", *shared, module, "kernel")
        t.append(HubTensor(f"{hub}shared_experts.{name}.weight", path, index, dims, 1, fp8=f8, quant="fp8"))
    if hashed:
        return t + [
            HubTensor(
                hub + "gate.tid2eid",
                ("selection_bias", *ours, "tid2eid"),
                index,
                (c.vocab_size, c.num_experts_per_tok),
                ids=True,
            )
        ]
    return t + [HubTensor(hub + "gate.bias", ("selection_bias", *ours, "e_score_correction_bias"), index, (E,))]


def _v4_block(c: ModelConfig, hub: str, ours: tuple, index: tuple, kind: tuple[str, str]) -> list[HubTensor]:
    """One V4 layer, ``layers.N.*`` (or an MTP module's block, ``mtp.D.*``); ``kind``: (layer type, MLP type)."""
    H = c.hidden_size
    return [
        _norm(hub, ours, index, "attn_norm", H),
        _norm(hub, ours, index, "ffn_norm", H),
        *_hc(c, hub, ours, index, "hc_attn"),
        *_hc(c, hub, ours, index, "hc_ffn"),
        *_v4_attention(c, hub, ours, index, kind[0]),
        *_v4_moe(c, hub + "ffn.", (*ours, "ffn"), index, hashed=kind[1] == "hash_moe"),
    ]


def _v4_tensors(c: ModelConfig) -> list[HubTensor]:
    """DeepSeek-V4's table. MTP module d: ``mtp.d.{enorm, hnorm, e_proj, h_proj, hc_head_*, norm}`` and its
    block (sliding-window attention, learned routing) under ``mtp.d.``; e_proj / h_proj are FP8 in the release."""
    H, V, f8 = c.hidden_size, c.vocab_size, c.fp8_weights
    t = [HubTensor("embed.weight", ("params", "embed_tokens", "embedding"), (), (V, H))]
    for run in layer_plan(c):
        for i, r, o in run.layers():
            index = (r,) if run.repeats > 1 else ()
            t += _v4_block(c, f"layers.{i}.", ("layers", run.name, f"block_{o}"), index, run.kinds[o])
    t += [_norm("", (), (), "norm", H), *_hc(c, "", (), (), "hc_head", head=True)]
    if not c.tie_word_embeddings:
        t.append(HubTensor("head.weight", ("params", "lm_head", "kernel"), (), (H, V), 1))
    for d in range(c.num_nextn_predict_layers):
        hub, ours = f"mtp.{d}.", (f"mtp_{d}",)
        t += [
            _norm(hub, ours, (), "enorm", H),
            _norm(hub, ours, (), "hnorm", H),
            _linear(hub, ours, (), "e_proj", (H,), (H,), f8, "fp8"),
            _linear(hub, ours, (), "h_proj", (H,), (H,), f8, "fp8"),
            *_hc(c, hub, ours, (), "hc_head", head=True),
            _norm(hub, ours, (), "norm", H),
            *_v4_block(c, hub, (*ours, "block"), (), (SLIDING, "moe")),
        ]
    return t


def mtp_prefix(c: ModelConfig) -> str:
    """The hub name prefix of the first MTP module's tensors."""
    return "mtp.0." if c.is_v4 else f"model.layers.{c.num_hidden_layers}."


def mtp_copies(c: ModelConfig) -> list[tuple[str, str]]:
    """(copy, shared) hub names: each MTP layer's embedding and output head, as the V3 release stores them
    (V4's release stores neither)."""
    if c.is_v4:
        return []
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
