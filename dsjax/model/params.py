"""Parameter counts and analytic training FLOPs, from one walk over the real module shapes.

total, main, mtp          every parameter (MTP modules apart)
activated                 what one token of the main model passes through (routed experts k/E)
matmul_per_token          the weights a training token multiplies by: activated minus the
                          embedding lookup, plus the MTP modules, plus the output head once
                          more per MTP depth (MTP shares it)
training FLOPs / token  = 6 x matmul_per_token + 3 x heads (d_qk + d_v) S per layer
                          (attention forward: 2 FLOPs x S/2 causal keys x 2 dots); DeepSeek-V4:
                          the keys a query reads (window + compressed entries) instead of S/2
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from dsjax.config import ModelConfig
from dsjax.model.transformer import abstract_variables

ROUTED = ("w_gate", "w_up", "w_down")  # the routed experts' stacked weights


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts (nothing allocated: ``jax.eval_shape`` of the model's init)."""
    params = nn.meta.unbox(abstract_variables(cfg)["params"])
    active = cfg.num_experts_per_tok / cfg.n_routed_experts
    head_uses = 1 + cfg.num_nextn_predict_layers
    counts = {"main": 0, "mtp": 0, "activated": 0, "routed_experts": 0, "embedding_and_head": 0}
    matmul = 0.0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        keys = [getattr(p, "key", str(p)) for p in path]
        n = int(leaf.size)
        is_mtp, routed = keys[0].startswith("mtp_"), keys[-1] in ROUTED
        counts["mtp" if is_mtp else "main"] += n
        if keys[0] in ("embed_tokens", "lm_head"):
            counts["embedding_and_head"] += n
        if not is_mtp:
            counts["routed_experts"] += n if routed else 0
            counts["activated"] += round(n * active) if routed else n
        if keys[0] != "embed_tokens":
            matmul += n * (active if routed else 1) * (head_uses if keys[0] == "lm_head" else 1)
    counts["total"] = counts["main"] + counts["mtp"]
    counts["matmul_per_token"] = round(matmul)
    return counts


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6 x matmul parameters per token + causal attention (module docstring); for MFU."""
    if cfg.is_v4:
        return 6.0 * count_params(cfg)["matmul_per_token"] + _v4_attention_flops(cfg, seq_len)
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    attention = 3 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len * layers
    return 6.0 * count_params(cfg)["matmul_per_token"] + attention


def _v4_attention_flops(cfg: ModelConfig, seq_len: int) -> float:
    """DeepSeek-V4's attention per token, forward + backward, averaged over the positions of a sequence:
    6 FLOPs x heads x (head_dim for q.k + head_dim for p v) x the keys a query reads -- its window, and
    the compressed entries it may see (CSA: at most index_topk of them) -- plus the CSA indexer's
    6 x index heads x index_head_dim x every visible entry. The MTP modules' blocks are sliding."""
    t = np.arange(1, seq_len + 1)
    window = np.minimum(t, cfg.sliding_window).mean()
    keys = {
        "sliding_attention": window,
        "compressed_sparse_attention": window + np.minimum(t // cfg.compress_rate_csa, cfg.index_topk).mean(),
        "heavily_compressed_attention": window + (t // cfg.compress_rate_hca).mean(),
    }
    core = 6 * cfg.num_attention_heads * 2 * cfg.head_dim
    flops = sum(core * keys[lt] for lt in cfg.layer_types) + cfg.num_nextn_predict_layers * core * window
    indexer = 6 * cfg.index_n_heads * cfg.index_head_dim * (t // cfg.compress_rate_csa).mean()
    return float(flops + indexer * cfg.layer_types.count("compressed_sparse_attention"))
