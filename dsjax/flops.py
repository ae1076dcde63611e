"""Analytic training FLOPs per token (for MFU): 6 x matmul parameters a token passes through,
plus causal attention.

    matmul params N = all weights a token uses (routed experts counted k/E), minus the embedding
                      lookup, plus the output head once more per MTP depth (MTP shares it)
    attention       = 3 x heads (d_qk + d_v) S per layer (forward: 2 FLOPs x S/2 causal keys x 2 dots)
"""

import flax.linen as nn
import jax

from dsjax.config import ModelConfig


def matmul_params_per_token(cfg: ModelConfig) -> int:
    from dsjax.model import abstract_variables

    params = nn.meta.unbox(abstract_variables(cfg)["params"])
    active = cfg.num_experts_per_tok / cfg.n_routed_experts
    total = 0.0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        keys = [getattr(p, "key", str(p)) for p in path]
        if keys[0] == "embed_tokens":
            continue
        n = leaf.size * (active if keys[-1] in ("w_gate", "w_up", "w_down") else 1)
        total += n * (1 + cfg.num_nextn_predict_layers) if keys[0] == "lm_head" else n
    return round(total)


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    attention = 3 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len * layers
    return 6.0 * matmul_params_per_token(cfg) + attention
