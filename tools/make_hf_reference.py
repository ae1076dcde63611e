"""Regenerate the Hugging Face reference fixtures in tests/fixtures/.

Run (needs torch + transformers 5 + safetensors, no network, no downloaded weights):

    /tmp/ref/bin/python tools/make_hf_reference.py [NAME ...]     # every fixture, or only those named

For every entry of FIXTURES it builds a tiny random DeepseekV3ForCausalLM / DeepseekV2ForCausalLM /
DeepseekV32ForCausalLM / DeepseekV4ForCausalLM from a config (all seeds fixed, so reruns write identical fixtures)
and writes tests/fixtures/<name>/ containing

    config.json        the config exactly as transformers writes it (`rope_parameters` spelling)
    model.safetensors  fp32 weights in hub naming (per-expert `mlp.experts.J.{gate,up,down}_proj.weight`); V4:
                       DeepSeek's release naming instead (below)
    reference.npz      input_ids int32 [2, 24] and logits float32 [2, 24, vocab] from the eager fp32 forward;
                       greedy_ids int32 [2, 8 + 16]: HF `generate` (greedy, EOS disabled, KV cache) from the
                       first greedy_prompt_len = 8 tokens of each row

Every parameter is re-drawn (weights ~ N(0, 0.08), RMSNorm weights ~ 1 + N(0, 0.1)) and V3 routers get a
non-zero e_score_correction_bias, so no part of the model is an identity.  The script checks that the routing
quirks (correction bias, group limit) actually change expert choices and that the written experts are the
per-expert hub tensors, prints the smallest routing margin, the logit scale and the config keys, and reloads
every fixture with AutoModelForCausalLM to confirm the saved files reproduce the reference logits.  The greedy
tokens are checked against the argmax of a full (uncached) forward over the generated sequence (a mismatch names
its row and position), the largest difference between generate's cached logits and the uncached ones is printed
(about 1e-6), and so is the smallest top-1 / top-2 logit gap along them (how far the decode tests are from a tie).
generate gets an explicit all-ones attention_mask: without one it treats every prompt token equal to pad_token_id
(0) as padding and masks it.

V3.2 fixtures (DSA) keep index_topk below the sequence length, so from query index_topk on the lightning indexer
decides which keys MLA sees. Their indexer is re-drawn too (wq_b, wk, weights_proj ~ N(0, 0.08); k_norm, a
LayerNorm: weight ~ 1 + N(0, 0.1), bias ~ N(0, 0.1)). The script hooks every indexer, re-derives its scores in
float64 from its weights, checks that HF's top-k is the top-k of those scores, and prints the smallest gap between
the k-th and (k+1)-th visible score of any query in any layer (over the reference input and the greedy sequence),
absolute and relative to that row's largest |score|; it must exceed MIN_TOPK_GAP (5e-4), so that fp32 rounding
(dsjax sums in another order) cannot change a selection. Scores are sum_j w_j ReLU(q_j . k): a key that every
index head's ReLU zeroes scores exactly 0, and with 2-4 index heads such zeros tied at the k-th place in every seed
tried; 8 index heads make them rare, and the seeds are chosen among those with the widest gaps (and a wide greedy
logit gap). The script also runs the same weights with index_topk = SEQ (every visible key kept: dense MLA) and
prints how far the logits move, which must be far beyond the tests' 1e-4 tolerance (and exactly 0 for the first
index_topk positions, which see at most index_topk keys).

V4 fixtures (DeepSeek-V4: per-layer sliding_attention / compressed_sparse_attention (CSA) /
heavily_compressed_attention (HCA), hc_mult mHC residual streams, hash_moe and sqrtsoftplus top-k MoE layers;
V4_FIXTURES) set layer_types, mlp_layer_types and compress_rates explicitly and together cover all three attention
types, hash and top-k MoE layers, compress rates that divide SEQ (CSA 4, HCA 8) and that leave a remainder (CSA 5,
HCA 7: tokens wait in the compressors' buffers, also across the cached decode), hc_mult 3 / 2 with 20 / 5 Sinkhorn
iterations, a sliding_window (6 / 5) below SEQ, YaRN on the compress RoPE (and a plain one with a small theta), and a
swiglu_limit (1.0) that clamps some routed- and shared-expert pre-activations. randomize_v4 re-draws every
parameter and buffer: weights ~ N(0, 0.08), RMSNorm weights ~ 1 + N(0, 0.1), attention sinks and the compressors' /
indexers' position_bias ~ N(0, 0.5), mHC (and hc_head) fn ~ N(0, 0.08), base ~ N(0, 0.5), scale ~ 1 + N(0, 0.2),
routers' e_score_correction_bias ~ U(-0.1, 0.1), and each hash layer's tid2eid row a random set of
num_experts_per_tok distinct experts. The script re-derives every router's choice (hash layers: tid2eid[token];
the others: top-k of sqrtsoftplus(x W^T) + bias, which must re-route some tokens; weights: the chosen unbiased
scores normalised, times routed_scaling_factor), counts the clamped SwiGLU entries (gate > limit, |up| > limit;
must be > 0 for routed and shared experts), and checks that the sliding window and YaRN move the logits by far more
than the tolerance. The CSA indexers are checked like V3.2's: their scores are re-derived in float64 (compressed
entry w pools tokens [(w - 1) m, (w + 1) m) through a per-channel softmax of gate + position_bias over the previous
window's first index_head_dim channels and its own window's last ones, RMSNorm, interleaved RoPE with the compress
theta at position w m; query s sees entries w < (s + 1) // m), HF's selection must be all visible entries when a
query sees at most index_topk of them and the float64 top-k otherwise, with the relative k-th / (k+1)-th gap above
MIN_TOPK_GAP; index_topk = SEQ must move the logits by far more than the tolerance while leaving them exactly equal
on the first (index_topk + 1) m - 1 tokens run alone (over the whole sequence only to ~1e-6 there: a token that
another selection re-routes changes the batches of the expert matmuls).

V4's model.safetensors uses DeepSeek's release names, what transformers' conversion_mapping "deepseek_v4" converts
from: embed.weight, head.weight, norm.weight, hc_head_{fn,base,scale} and layers.N.{attn_norm.weight,
ffn_norm.weight, hc_attn_{fn,base,scale}, hc_ffn_{fn,base,scale}}, layers.N.attn.{wq_a, q_norm, wq_b, wkv, kv_norm,
wo_a, wo_b}.weight and attn.attn_sink, attn.compressor.{wkv.weight, wgate.weight, ape, norm.weight} (CSA and HCA),
attn.indexer.{wq_b, weights_proj}.weight and attn.indexer.compressor.{wkv.weight, wgate.weight, ape, norm.weight}
(CSA), ffn.gate.weight with ffn.gate.bias (top-k layers) or ffn.gate.tid2eid (hash layers, int64 as in the release),
per-expert ffn.experts.J.{w1 (gate), w3 (up), w2 (down)}.weight and ffn.shared_experts.{w1,w2,w3}.weight; all fp32
except tid2eid. transformers 5.25's save_pretrained only half reverses the mapping (it keeps the `model.` prefix,
embed_tokens and hc_head.*, and writes the attention's own kv_norm as attn.norm.weight, where the release has
attn.kv_norm.weight and only the compressors' norms are `norm`), so the script writes the file itself
(V4_LAYER_NAMES, V4_TOP_NAMES) and proves the names by
reloading the directory with AutoModelForCausalLM, i.e. through HF's own conversion: no missing, unexpected or
mismatched keys, every tensor equal to the original and the reference logits reproduced bit for bit.
"""

import copy
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    DeepseekV4Config,
    DeepseekV4ForCausalLM,
    DeepseekV32Config,
    DeepseekV32ForCausalLM,
)
from transformers.utils.logging import disable_progress_bar

OUT_DIR = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
BATCH, SEQ = 2, 24
GREEDY_PROMPT, GREEDY_NEW = 8, 16
WEIGHT_STD, NORM_STD, BIAS_RANGE = 0.08, 0.1, 0.1
MAX_FIXTURE_BYTES = 8 * 2**20  # all fixtures together; a V4 fixture alone is about 0.7-1 MiB
# V3.2: the indexer's top-k must not hinge on fp32 rounding (dsjax computes the same scores in another order), and
# the selection must move the logits far more than the tests' tolerance.
MIN_TOPK_GAP, LOGIT_TOLERANCE = 5e-4, 1e-4

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=4,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    kv_lora_rank=32,
    moe_intermediate_size=16,
    intermediate_size=96,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    dtype="float32",
)


def yarn(factor, original, mscale, mscale_all_dim, theta):
    return dict(
        rope_type="yarn",
        rope_theta=theta,
        factor=factor,
        original_max_position_embeddings=original,
        beta_fast=32,
        beta_slow=1,
        mscale=mscale,
        mscale_all_dim=mscale_all_dim,
    )


PLAIN_ROPE = dict(rope_type="default", rope_theta=10000.0)

FIXTURES = [
    dict(
        name="v3_qlora_groups",
        model_class=DeepseekV3ForCausalLM,
        config_class=DeepseekV3Config,
        seed=1,
        config=dict(
            q_lora_rank=24,
            num_hidden_layers=3,
            first_k_dense_replace=1,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=3,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            rope_parameters=yarn(4.0, 32, 1.0, 1.0, 10000.0),
            max_position_embeddings=128,
            num_mtp_layers=0,
        ),
    ),
    dict(
        name="v3_no_qlora",
        model_class=DeepseekV3ForCausalLM,
        config_class=DeepseekV3Config,
        seed=2,
        config=dict(
            q_lora_rank=None,
            num_hidden_layers=2,
            first_k_dense_replace=1,
            n_routed_experts=8,
            n_shared_experts=2,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            norm_topk_prob=True,
            routed_scaling_factor=1.5,
            rope_parameters=PLAIN_ROPE,
            max_position_embeddings=64,
            num_mtp_layers=0,
        ),
    ),
    dict(
        name="v3_deep_dense2",
        model_class=DeepseekV3ForCausalLM,
        config_class=DeepseekV3Config,
        seed=3,
        config=dict(
            q_lora_rank=16,
            num_hidden_layers=4,
            first_k_dense_replace=2,
            n_routed_experts=16,
            n_shared_experts=1,
            num_experts_per_tok=4,
            n_group=4,
            topk_group=3,
            norm_topk_prob=False,
            routed_scaling_factor=2.0,
            rope_parameters=yarn(8.0, 16, 0.707, 0.707, 500.0),
            max_position_embeddings=128,
            num_mtp_layers=0,
        ),
    ),
    dict(
        name="v2_lite_style",
        model_class=DeepseekV2ForCausalLM,
        config_class=DeepseekV2Config,
        seed=4,
        config=dict(
            q_lora_rank=None,
            num_hidden_layers=3,
            first_k_dense_replace=1,
            n_routed_experts=8,
            n_shared_experts=2,
            num_experts_per_tok=3,
            n_group=1,
            topk_group=1,
            topk_method="greedy",
            norm_topk_prob=False,
            routed_scaling_factor=1.0,
            rope_parameters=yarn(4.0, 32, 0.707, 0.707, 10000.0),
            max_position_embeddings=128,
        ),
    ),
    dict(
        name="v2_group_limited",
        model_class=DeepseekV2ForCausalLM,
        config_class=DeepseekV2Config,
        seed=5,
        config=dict(
            q_lora_rank=24,
            num_hidden_layers=2,
            first_k_dense_replace=1,
            n_routed_experts=8,
            n_shared_experts=1,
            # With max-per-group scores, top-2 experts always lie in the top-2 groups, so k=2 would make the
            # group limit a no-op; k=3 lets it mask experts.
            num_experts_per_tok=3,
            n_group=4,
            topk_group=2,
            topk_method="group_limited_greedy",
            norm_topk_prob=False,
            routed_scaling_factor=16.0,
            rope_parameters=PLAIN_ROPE,
            max_position_embeddings=64,
        ),
    ),
    # DeepSeek-V3.2 (DSA): index_topk < SEQ, so the indexer's choice masks keys from query index_topk on.
    dict(
        name="v32_yarn_groups",
        model_class=DeepseekV32ForCausalLM,
        config_class=DeepseekV32Config,
        seed=5,
        config=dict(
            q_lora_rank=24,
            num_hidden_layers=3,
            first_k_dense_replace=1,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=3,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            rope_parameters=yarn(4.0, 32, 1.0, 1.0, 10000.0),
            max_position_embeddings=128,
            index_topk=8,
            index_n_heads=8,
            index_head_dim=16,
        ),
    ),
    dict(
        name="v32_dense2",
        model_class=DeepseekV32ForCausalLM,
        config_class=DeepseekV32Config,
        seed=8,
        config=dict(
            q_lora_rank=16,
            num_hidden_layers=3,
            first_k_dense_replace=2,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            norm_topk_prob=False,
            routed_scaling_factor=1.5,
            rope_parameters=PLAIN_ROPE,
            max_position_embeddings=64,
            index_topk=5,
            index_n_heads=8,
            index_head_dim=12,
        ),
    ),
]


# DeepSeek-V4 (layer_types sliding / CSA / HCA, mHC streams, hash + sqrtsoftplus MoE). Not COMMON: V4 has no MLA
# latent (kv_lora_rank, qk_nope_head_dim, v_head_dim); one shared K=V head of head_dim, partial RoPE on its last
# qk_rope_head_dim = head_dim * partial_rotary_factor = 8 channels.
V4_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    num_attention_heads=4,
    head_dim=32,
    partial_rotary_factor=0.25,
    q_lora_rank=32,
    o_groups=2,
    o_lora_rank=16,
    moe_intermediate_size=16,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    scoring_func="sqrtsoftplus",
    routed_scaling_factor=1.5,
    index_n_heads=8,
    index_head_dim=16,
    rope_theta=10000.0,
    num_nextn_predict_layers=0,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    dtype="float32",
)
SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
V4_SINK_STD, V4_APE_STD = 0.5, 0.5  # attention sinks, compressor / indexer position_bias ("ape")
HC_FN_STD, HC_BASE_STD, HC_SCALE_STD = WEIGHT_STD, 0.5, 0.2  # mHC fn ~ N(0, .08), base ~ N(0, .5), scale ~ 1 + N(0, .2)

V4_FIXTURES = [
    # SEQ = 24 is a multiple of both compress rates: 6 CSA entries (index_topk 3 of them) and 3 HCA entries; YaRN on
    # the compress RoPE (theta 160000), plain main RoPE (theta 10000) on the sliding layer.
    dict(
        name="v4_divides_yarn_hc3",
        model_class=DeepseekV4ForCausalLM,
        config_class=DeepseekV4Config,
        common=V4_COMMON,
        seed=34,
        config=dict(
            num_hidden_layers=4,
            layer_types=[SLIDING, CSA, HCA, CSA],
            mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"],
            compress_rates={CSA: 4, HCA: 8},
            hc_mult=3,
            hc_sinkhorn_iters=20,
            sliding_window=6,
            index_topk=3,
            swiglu_limit=1.0,
            compress_rope_theta=160000.0,
            rope_scaling=dict(type="yarn", factor=4, original_max_position_embeddings=16, beta_fast=32, beta_slow=1),
        ),
    ),
    # Compress rates that leave a remainder: 24 = 4 * 5 + 4 (CSA) = 3 * 7 + 3 (HCA), so the last tokens wait in the
    # compressors' buffers; prompt 8 = 5 + 3 = 7 + 1 for the cached decode. Plain compress RoPE with a small theta.
    dict(
        name="v4_ragged_hc2",
        model_class=DeepseekV4ForCausalLM,
        config_class=DeepseekV4Config,
        common=V4_COMMON,
        seed=7,
        config=dict(
            num_hidden_layers=3,
            layer_types=[HCA, CSA, SLIDING],
            mlp_layer_types=["hash_moe", "moe", "moe"],
            compress_rates={CSA: 5, HCA: 7},
            hc_mult=2,
            hc_sinkhorn_iters=5,
            sliding_window=5,
            index_topk=2,
            swiglu_limit=1.0,
            compress_rope_theta=1000.0,
        ),
    ),
]
FIXTURES += V4_FIXTURES


def randomize(model, gen):
    """Redraw every parameter (and V3 correction biases) from seeded distributions: norm weights ~ 1 + N(0, NORM_STD),
    LayerNorm biases (the V3.2 indexer's k_norm) ~ N(0, NORM_STD), every other weight ~ N(0, WEIGHT_STD)."""
    with torch.no_grad():
        for module in model.modules():
            kind = type(module).__name__
            is_norm = kind.endswith("RMSNorm") or kind == "LayerNorm"
            for pname, param in module.named_parameters(recurse=False):
                noise = torch.randn(param.shape, generator=gen)
                if is_norm:
                    param.copy_(NORM_STD * noise if pname == "bias" else 1.0 + NORM_STD * noise)
                else:
                    param.copy_(WEIGHT_STD * noise)
            if hasattr(module, "e_score_correction_bias"):
                bias = module.e_score_correction_bias
                bias.copy_((2 * torch.rand(bias.shape, generator=gen) - 1) * BIAS_RANGE)


def select_experts(router, x, use_bias=True, use_groups=True):
    """Re-derive the router's expert choice: (sorted indices [T, k], smallest decision margin, choice scores)."""
    logits = x.float() @ router.weight.float().T
    is_v3 = hasattr(router, "e_score_correction_bias")
    if is_v3:
        scores = logits.sigmoid() + (router.e_score_correction_bias if use_bias else 0.0)
        grouped = router.num_group > 1
    else:
        scores = logits.softmax(dim=-1)
        grouped = router.topk_method == "group_limited_greedy"
    margins = []
    if grouped and use_groups:
        per_group = scores.view(len(scores), router.num_group, -1)
        group_scores = per_group.topk(2, dim=-1).values.sum(-1) if is_v3 else per_group.max(-1).values
        ranked = group_scores.sort(dim=-1, descending=True).values
        margins.append(ranked[:, router.topk_group - 1] - ranked[:, router.topk_group])
        kept = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(router.topk_group, dim=-1).indices, 1)
        scores_masked = scores.masked_fill(~kept.bool().repeat_interleave(per_group.shape[-1], dim=1), -torch.inf)
    else:
        scores_masked = scores
    ranked = scores_masked.sort(dim=-1, descending=True).values
    margins.append(ranked[:, router.top_k - 1] - ranked[:, router.top_k])
    indices = scores_masked.topk(router.top_k, dim=-1).indices.sort(dim=-1).values
    return indices, min(m.min().item() for m in margins), scores


def routing_checks(model, input_ids):
    """Run the model once with hooks on every router and print what the routing quirks change."""
    captured = []
    routers = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    hooks = [r.register_forward_hook(lambda m, args, out: captured.append((m, args[0], out[2]))) for r in routers]
    with torch.no_grad():
        model(input_ids)
    for hook in hooks:
        hook.remove()

    margin = float("inf")
    for router, x, hf_indices in captured:
        x = x.reshape(-1, x.shape[-1])
        indices, layer_margin, scores = select_experts(router, x)
        assert torch.equal(indices, hf_indices.sort(dim=-1).values), "re-derived routing disagrees with HF"
        margin = min(margin, layer_margin)
        if hasattr(router, "e_score_correction_bias"):
            assert scores.min() >= 0, "sigmoid(score) + bias went negative"

    router, x, _ = captured[0]
    x = x.reshape(-1, x.shape[-1])
    chosen = select_experts(router, x)[0]
    print(f"  smallest routing margin over all MoE layers: {margin:.2e}")
    if hasattr(router, "e_score_correction_bias"):
        changed = (select_experts(router, x, use_bias=False)[0] != chosen).any(-1).sum().item()
        print(f"  first MoE layer: correction bias changes the expert set of {changed}/{len(x)} tokens")
        print("  sigmoid(score) + bias >= 0 in every MoE layer")
        assert changed > 0, "the correction bias never changes the routing"
    if router.num_group > 1:
        masked = (select_experts(router, x, use_groups=False)[0] != chosen).any(-1).sum().item()
        print(f"  first MoE layer: group limit changes the expert set of {masked}/{len(x)} tokens")
        assert masked > 0, "the group limit never changes the routing"


def indexer_scores(indexer, hidden, q_resid, cos, sin):
    """A V3.2 indexer's scores re-derived in float64 from its weights: I[b,s,t] = sum_j w[b,s,j] ReLU(q[b,s,j].k[b,t])
    with the scales, half-split RoPE on the first qk_rope_head_dim channels, and no mask."""
    f64, rot = torch.float64, indexer.qk_rope_head_dim
    b, s, _ = hidden.shape
    hidden = hidden.to(f64)
    q = (q_resid.to(f64) @ indexer.wq_b.weight.to(f64).T).view(b, s, indexer.n_heads, indexer.head_dim)
    norm = indexer.k_norm
    k = torch.nn.functional.layer_norm(
        hidden @ indexer.wk.weight.to(f64).T, (indexer.head_dim,), norm.weight.to(f64), norm.bias.to(f64), norm.eps
    )
    cos, sin = cos.to(f64)[..., : rot // 2], sin.to(f64)[..., : rot // 2]  # HF's cos / sin are cat(freqs, freqs)

    def rope(x, cos, sin):  # pairs (i, i + rot / 2)
        x1, x2 = x[..., : rot // 2], x[..., rot // 2 : rot]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rot:]], dim=-1)

    q, k = rope(q, cos[:, :, None], sin[:, :, None]), rope(k, cos, sin)
    scores = torch.einsum("bsjd,btd->bsjt", q, k).relu() * indexer.softmax_scale
    weights = hidden @ indexer.weights_proj.weight.to(f64).T * indexer.n_heads**-0.5
    return torch.einsum("bsj,bsjt->bst", weights, scores)


def indexer_margin(model, input_ids):
    """Run the model once with hooks on every indexer, re-derive its scores and check HF's top-k against them. Returns
    (smallest gap between the k-th and (k+1)-th visible scores relative to the row's largest |score|, the same gap
    absolute, number of queries that see more than k keys over all layers)."""
    captured = []
    indexers = [layer.self_attn.indexer for layer in model.model.layers]
    hooks = [m.register_forward_hook(lambda m, args, out: captured.append((m, *args[:3], out))) for m in indexers]
    with torch.no_grad():
        model(input_ids)
    for hook in hooks:
        hook.remove()

    k, seq = model.config.index_topk, input_ids.shape[1]
    visible = torch.ones(seq, seq, dtype=torch.bool).tril()
    rel_gap = abs_gap = float("inf")
    for indexer, hidden, q_resid, (cos, sin), hf_indices in captured:
        scores = indexer_scores(indexer, hidden, q_resid, cos, sin).masked_fill(~visible, -torch.inf)
        # Queries 0..k-1 see at most k keys and keep them all; HF's top-k fills up with masked keys there.
        for s in range(min(k, seq)):
            assert all(set(range(s + 1)) <= set(row.tolist()) for row in hf_indices[:, s]), "a visible key dropped"
        chosen = scores[:, k:].topk(k, dim=-1).indices.sort(dim=-1).values
        assert torch.equal(chosen, hf_indices[:, k:].long().sort(dim=-1).values), "re-derived top-k disagrees with HF"
        ranked = scores[:, k:].sort(dim=-1, descending=True).values
        gap = ranked[..., k - 1] - ranked[..., k]
        scale = scores[:, k:].masked_fill(~visible[k:], 0).abs().amax(-1)
        rel_gap = min(rel_gap, (gap / scale).min().item())
        abs_gap = min(abs_gap, gap.min().item())
    return rel_gap, abs_gap, len(captured) * input_ids.shape[0] * max(seq - k, 0)


def indexer_checks(model, input_ids, greedy_ids, logits):
    """Print the indexer's top-k margins (over the reference input and the greedy sequence) and how much the selection
    moves the logits: the same weights with index_topk = SEQ (every visible key kept, i.e. dense MLA)."""
    k = model.config.index_topk
    assert k < SEQ, "index_topk must be below the sequence length, or the indexer selects nothing"
    rel, gap, n = min(indexer_margin(model, ids) for ids in (input_ids, greedy_ids))
    print(f"  indexer (top-{k} of <= {SEQ} keys): {n} (layer, query) rows per input choose among more than {k} keys")
    print(f"  smallest top-k gap (k-th vs (k+1)-th visible score): {gap:.2e} absolute, {rel:.2e} of the row's max")
    assert rel > MIN_TOPK_GAP, f"indexer top-k too close to a tie: relative gap {rel:.1e}"

    dense_config = copy.deepcopy(model.config)
    dense_config.index_topk = SEQ
    dense = type(model)(dense_config).eval()
    dense.load_state_dict(model.state_dict())
    with torch.no_grad():
        dense_logits = dense(input_ids).logits.float()
    effect = (dense_logits - logits).abs()
    print(
        f"  selection effect: max |logits - logits(index_topk={SEQ}, dense)| = {effect.max():.3f} "
        f"(mean {effect.mean():.3f}; positions < {k}: {effect[:, :k].max():.1e})"
    )
    assert effect[:, :k].max() == 0 and effect.max() > 100 * LOGIT_TOLERANCE, "the selection does not matter"


def check_hub_names(path, model):
    """The file must hold per-expert hub tensors equal to the fused in-memory experts (gate rows first), V3
    correction biases, and no fused expert tensors."""
    config = model.config
    with safe_open(path, "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert not any("gate_up_proj" in n or n.endswith("experts.down_proj") for n in tensors), "fused experts written"
    for layer in range(config.first_k_dense_replace, config.num_hidden_layers):
        prefix = f"model.layers.{layer}.mlp"
        mlp = model.model.layers[layer].mlp
        gate, up = mlp.experts.gate_up_proj.chunk(2, dim=1)
        for j in range(config.n_routed_experts):
            for proj, fused in (("gate", gate), ("up", up), ("down", mlp.experts.down_proj)):
                assert torch.equal(tensors[f"{prefix}.experts.{j}.{proj}_proj.weight"], fused[j])
        assert torch.equal(tensors[f"{prefix}.gate.weight"], mlp.gate.weight)
        if config.model_type in ("deepseek_v3", "deepseek_v32"):
            assert torch.equal(tensors[f"{prefix}.gate.e_score_correction_bias"], mlp.gate.e_score_correction_bias)
    if config.model_type == "deepseek_v32":
        for layer in range(config.num_hidden_layers):
            indexer = model.model.layers[layer].self_attn.indexer
            for name, param in indexer.named_parameters():
                assert torch.equal(tensors[f"model.layers.{layer}.self_attn.indexer.{name}"], param), name
        assert sum(".indexer." in n for n in tensors) == 5 * config.num_hidden_layers
    return tensors


def randomize_v4(model, gen):
    """V4: redraw every parameter and persistent buffer. Norm weights ~ 1 + N(0, NORM_STD); attention sinks and
    compressor / indexer position biases ~ N(0, 0.5); mHC fn ~ N(0, WEIGHT_STD), base ~ N(0, 0.5), scale ~ 1 + N(0, 0.2)
    (hc_head likewise); every other weight ~ N(0, WEIGHT_STD); routers' e_score_correction_bias ~ U(-BIAS_RANGE,
    BIAS_RANGE); each hash layer's tid2eid row num_experts_per_tok distinct random experts."""
    with torch.no_grad():
        for module in model.modules():
            kind = type(module).__name__
            for pname, param in module.named_parameters(recurse=False):
                noise = torch.randn(param.shape, generator=gen)
                if kind.endswith("RMSNorm"):
                    param.copy_(1.0 + NORM_STD * noise)
                elif pname == "sinks":
                    param.copy_(V4_SINK_STD * noise)
                elif pname == "position_bias":
                    param.copy_(V4_APE_STD * noise)
                elif kind in ("DeepseekV4HyperConnection", "DeepseekV4HyperHead"):
                    std = {"fn": HC_FN_STD, "base": HC_BASE_STD, "scale": HC_SCALE_STD}[pname.removeprefix("hc_")]
                    param.copy_(1.0 + std * noise if pname.endswith("scale") else std * noise)
                else:
                    param.copy_(WEIGHT_STD * noise)
            if hasattr(module, "e_score_correction_bias"):
                bias = module.e_score_correction_bias
                bias.copy_((2 * torch.rand(bias.shape, generator=gen) - 1) * BIAS_RANGE)
            if hasattr(module, "tid2eid"):
                table = module.tid2eid
                ranks = torch.rand(table.shape[0], module.num_experts, generator=gen).argsort(dim=-1)
                table.copy_(ranks[:, : table.shape[1]])


def capture(modules, run):
    """(module, forward args, output) of every call of `modules` while `run()` runs."""
    captured = []
    hooks = [m.register_forward_hook(lambda m, args, out: captured.append((m, args, out))) for m in modules]
    try:
        with torch.no_grad():
            run()
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def v4_routing_checks(model, input_ids):
    """Re-derive every V4 router's choice: hash layers take tid2eid[token]; the others the top-k of sqrtsoftplus(x W^T)
    + e_score_correction_bias. Print the smallest margin and how many tokens the correction bias re-routes."""
    gates = [layer.mlp.gate for layer in model.model.layers]
    captured = capture(gates, lambda: model(input_ids))
    margin, changed, routed = float("inf"), 0, 0
    for gate, args, (_, weights, indices) in captured:
        x = args[0].reshape(-1, args[0].shape[-1]).double()
        scores = torch.nn.functional.softplus(x @ gate.weight.double().T).sqrt()
        if hasattr(gate, "tid2eid"):
            expected = gate.tid2eid[args[1].reshape(-1)]
            assert torch.equal(indices, expected), "hash routing is not tid2eid[input_ids]"
        else:
            biased = scores + gate.e_score_correction_bias.double()
            expected = biased.topk(gate.top_k, dim=-1).indices
            assert torch.equal(indices.sort(-1).values, expected.sort(-1).values), "re-derived routing disagrees"
            ranked = biased.sort(dim=-1, descending=True).values
            margin = min(margin, (ranked[:, gate.top_k - 1] - ranked[:, gate.top_k]).min().item())
            unbiased = scores.topk(gate.top_k, dim=-1).indices.sort(-1).values
            changed += (unbiased != expected.sort(-1).values).any(-1).sum().item()
            routed += len(x)
        picked = scores.gather(1, indices)
        expected_weights = picked / picked.sum(-1, keepdim=True) * gate.routed_scaling_factor
        assert torch.allclose(weights.double(), expected_weights, atol=1e-6), "router weights differ"
    print(f"  smallest routing margin over the top-k MoE layers: {margin:.2e}")
    print(f"  correction bias changes the expert set of {changed}/{routed} top-k routed tokens (all layers)")
    assert changed > 0, "the correction bias never changes the routing"


def swiglu_clamp_counts(model, input_ids):
    """How many routed-expert (of the chosen experts) and shared-expert SwiGLU pre-activations the swiglu_limit clamp
    changes: gate > limit (the gate is clamped from above only), |up| > limit."""
    limit, inter = model.config.swiglu_limit, model.config.moe_intermediate_size
    experts = [layer.mlp.experts for layer in model.model.layers]
    shared = [layer.mlp.shared_experts for layer in model.model.layers]
    captured = capture(experts + shared, lambda: model(input_ids))
    counts = {"routed": [0, 0], "shared": [0, 0]}
    for module, args, _ in captured:
        if module in shared:
            gate, up, kind = module.gate_proj(args[0]), module.up_proj(args[0]), "shared"
        else:
            x, indices = args[0], args[1]
            gate_up = torch.einsum("th,tkih->tki", x, module.gate_up_proj[indices])
            gate, up, kind = gate_up[..., :inter], gate_up[..., inter:], "routed"
        counts[kind][0] += (gate > limit).sum().item() + (up.abs() > limit).sum().item()
        counts[kind][1] += gate.numel() + up.numel()
    for kind, (clamped, total) in counts.items():
        print(f"  swiglu_limit {limit}: {clamped}/{total} {kind}-expert gate/up pre-activations clamped")
        assert clamped > 0, f"the swiglu clamp never acts on a {kind} expert"
    return counts


def v4_rope(x, positions, rotary):
    """V4's interleaved RoPE in float64 on the last 2 * len(inv_freq) channels (pairs (2i, 2i + 1)), compress rope."""
    angle = positions.double()[..., None] * rotary.compress_inv_freq.double()
    cos, sin = angle.cos() * rotary.compress_attention_scaling, angle.sin() * rotary.compress_attention_scaling
    if x.dim() == 4:  # [B, S, H, D]
        cos, sin = cos[:, :, None], sin[:, :, None]
    width = 2 * cos.shape[-1]
    x1, x2 = x[..., -width::2], x[..., -width + 1 :: 2]
    rotated = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return torch.cat([x[..., :-width], rotated], dim=-1)


def v4_indexer_scores(indexer, hidden, q_residual, position_ids):
    """A V4 CSA indexer's scores re-derived in float64 from its weights, [B, S, n_entries], no mask. Entry w pools
    tokens [(w - 1) m, (w + 1) m): softmax over the 2m slots (per channel) of gate + position_bias, taking the first
    head_dim channels of window w - 1's kv / gate and the last head_dim of window w's (w = 0: only its own window),
    RMSNorm, RoPE at position w m; then I[s, w] = sum_h w_h(s) ReLU(q_h(s) . k_w) / sqrt(head_dim)."""
    f64, m, d = torch.float64, indexer.compress_rate, indexer.head_dim
    hidden = hidden.to(f64)
    b, s, _ = hidden.shape
    n = s // m
    kv = (hidden @ indexer.kv_proj.weight.to(f64).T)[:, : n * m].view(b, n, m, 2 * d)
    gate = (hidden @ indexer.gate_proj.weight.to(f64).T)[:, : n * m].view(b, n, m, 2 * d)
    gate = gate + indexer.position_bias.to(f64)
    prev_kv = torch.cat([torch.zeros_like(kv[:, :1, :, :d]), kv[:, :-1, :, :d]], dim=1)
    prev_gate = torch.cat([torch.full_like(gate[:, :1, :, :d], -torch.inf), gate[:, :-1, :, :d]], dim=1)
    slots_kv, slots_gate = torch.cat([prev_kv, kv[..., d:]], dim=2), torch.cat([prev_gate, gate[..., d:]], dim=2)
    pooled = (slots_kv * slots_gate.softmax(dim=2)).sum(dim=2)
    norm = indexer.kv_norm
    pooled = pooled * torch.rsqrt(pooled.square().mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight.to(f64)
    keys = v4_rope(pooled, (torch.arange(n) * m).expand(b, -1), indexer.rotary_emb)
    q = (q_residual.to(f64) @ indexer.q_b_proj.weight.to(f64).T).view(b, s, indexer.num_heads, d)
    q = v4_rope(q, position_ids.expand(b, -1), indexer.rotary_emb)
    scores = torch.einsum("bshd,btd->bsht", q, keys).relu() * d**-0.5
    weights = hidden @ indexer.scorer.weights_proj.weight.to(f64).T * indexer.num_heads**-0.5
    return torch.einsum("bsh,bsht->bst", weights, scores)


def v4_indexer_margin(model, input_ids):
    """Hook every CSA indexer, re-derive its scores and check HF's selection: all visible entries when a query sees at
    most index_topk of them (query s sees entries w < (s + 1) // m), else the float64 top-k of the visible ones.
    Returns (smallest relative gap, smallest absolute gap, number of (layer, row, query) with more than k visible)."""
    indexers = [layer.self_attn.compressor.indexer for layer in model.model.layers if layer.self_attn.layer_type == CSA]
    captured = capture(indexers, lambda: model(input_ids))
    rel_gap = abs_gap = float("inf")
    deciding = 0
    for indexer, args, hf_indices in captured:
        hidden, q_residual, position_ids = args[:3]
        scores = v4_indexer_scores(indexer, hidden, q_residual, position_ids)
        k = indexer.index_topk
        for row in range(hidden.shape[0]):
            for s, pos in enumerate(position_ids[0].tolist()):
                visible = min((pos + 1) // indexer.compress_rate, scores.shape[-1])
                chosen = sorted(i for i in hf_indices[row, s].tolist() if i >= 0)
                if visible <= k:
                    assert chosen == list(range(visible)), f"query {s} does not keep its {visible} visible entries"
                    continue
                deciding += 1
                ranked = scores[row, s, :visible].sort(descending=True)
                assert chosen == sorted(ranked.indices[:k].tolist()), "re-derived top-k disagrees with HF"
                gap = (ranked.values[k - 1] - ranked.values[k]).item()
                abs_gap = min(abs_gap, gap)
                rel_gap = min(rel_gap, gap / ranked.values.abs().max().item())
    return rel_gap, abs_gap, deciding


def v4_indexer_checks(model, input_ids, greedy_ids, logits):
    """Print the CSA indexers' top-k margins (reference input and greedy sequence) and how much the selection moves
    the logits: the same weights with index_topk = SEQ (every visible compressed entry kept)."""
    config = model.config
    k, m = config.index_topk, config.compress_rates[CSA]
    n_entries = SEQ // m
    assert k < n_entries, "index_topk must be below the number of compressed entries, or the indexer selects nothing"
    rel, gap, n = min(v4_indexer_margin(model, ids) for ids in (input_ids, greedy_ids))
    print(f"  indexer (top-{k} of <= {n_entries} entries, m={m}): {n} (layer, row, query) choose among more than {k}")
    print(f"  smallest top-k gap (k-th vs (k+1)-th visible score): {gap:.2e} absolute, {rel:.2e} of the row's max")
    assert rel > MIN_TOPK_GAP, f"indexer top-k too close to a tie: relative gap {rel:.1e}"

    dense_config = copy.deepcopy(config)
    dense_config.index_topk = SEQ
    dense = type(model)(dense_config).eval()
    dense.load_state_dict(model.state_dict())
    first = (k + 1) * m - 1  # the first query that sees more than k entries
    with torch.no_grad():
        dense_logits = dense(input_ids).logits.float()
        # Before `first` the two agree exactly on a prefix; over the whole sequence only to ~1e-6 there, since a
        # re-routed later token changes the batches of the expert matmuls.
        prefix_effect = (dense(input_ids[:, :first]).logits - model(input_ids[:, :first]).logits).abs().max()
    effect = (dense_logits - logits).abs()
    print(
        f"  selection effect: max |logits - logits(index_topk={SEQ})| = {effect.max():.3f} "
        f"(mean {effect.mean():.3f}; on the first {first} tokens alone: {prefix_effect:.1e})"
    )
    assert prefix_effect == 0 and effect.max() > 100 * LOGIT_TOLERANCE, "the selection does not matter"


# HF DeepseekV4 names (under model.layers.N.) -> DeepSeek's release names (under layers.N.): the inverse of
# transformers' conversion_mapping "deepseek_v4". The attention's own kv_norm keeps its name; only the compressors'
# kv_norm is the release's `norm` (HF's `.norm.` -> `.kv_norm.` rename cannot hit `attn.kv_norm`, nor the top-level
# `norm.weight`, which has no dot before it).
V4_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "attn_hc.fn": "hc_attn_fn",
    "attn_hc.base": "hc_attn_base",
    "attn_hc.scale": "hc_attn_scale",
    "ffn_hc.fn": "hc_ffn_fn",
    "ffn_hc.base": "hc_ffn_base",
    "ffn_hc.scale": "hc_ffn_scale",
    "self_attn.sinks": "attn.attn_sink",
    "self_attn.q_a_proj.weight": "attn.wq_a.weight",
    "self_attn.q_a_norm.weight": "attn.q_norm.weight",
    "self_attn.q_b_proj.weight": "attn.wq_b.weight",
    "self_attn.kv_proj.weight": "attn.wkv.weight",
    "self_attn.kv_norm.weight": "attn.kv_norm.weight",
    "self_attn.o_a_proj.weight": "attn.wo_a.weight",
    "self_attn.o_b_proj.weight": "attn.wo_b.weight",
    "self_attn.compressor.kv_proj.weight": "attn.compressor.wkv.weight",
    "self_attn.compressor.gate_proj.weight": "attn.compressor.wgate.weight",
    "self_attn.compressor.position_bias": "attn.compressor.ape",
    "self_attn.compressor.kv_norm.weight": "attn.compressor.norm.weight",
    "self_attn.compressor.indexer.kv_proj.weight": "attn.indexer.compressor.wkv.weight",
    "self_attn.compressor.indexer.gate_proj.weight": "attn.indexer.compressor.wgate.weight",
    "self_attn.compressor.indexer.position_bias": "attn.indexer.compressor.ape",
    "self_attn.compressor.indexer.kv_norm.weight": "attn.indexer.compressor.norm.weight",
    "self_attn.compressor.indexer.q_b_proj.weight": "attn.indexer.wq_b.weight",
    "self_attn.compressor.indexer.scorer.weights_proj.weight": "attn.indexer.weights_proj.weight",
    "mlp.gate.weight": "ffn.gate.weight",
    "mlp.gate.e_score_correction_bias": "ffn.gate.bias",
    "mlp.gate.tid2eid": "ffn.gate.tid2eid",
    "mlp.shared_experts.gate_proj.weight": "ffn.shared_experts.w1.weight",
    "mlp.shared_experts.up_proj.weight": "ffn.shared_experts.w3.weight",
    "mlp.shared_experts.down_proj.weight": "ffn.shared_experts.w2.weight",
}
V4_TOP_NAMES = {
    "model.embed_tokens.weight": "embed.weight",
    "lm_head.weight": "head.weight",
    "model.norm.weight": "norm.weight",
    "model.hc_head.hc_fn": "hc_head_fn",
    "model.hc_head.hc_base": "hc_head_base",
    "model.hc_head.hc_scale": "hc_head_scale",
}


def v4_release_tensors(model):
    """The state dict under the release's names: per-expert ffn.experts.J.{w1 (gate), w3 (up), w2 (down)}.weight from
    HF's fused gate_up_proj (gate rows first) / down_proj; tid2eid int64, as the release. Every HF key is mapped."""
    tensors = {}
    inter = model.config.moe_intermediate_size
    for name, value in model.state_dict().items():
        value = value.detach().clone().contiguous()
        if name in V4_TOP_NAMES:
            tensors[V4_TOP_NAMES[name]] = value
            continue
        prefix, layer, rest = name.split(".", 3)[1:] if name.startswith("model.layers.") else (None, None, name)
        assert prefix == "layers", f"unmapped tensor {name}"
        if rest == "mlp.experts.gate_up_proj":
            for j, fused in enumerate(value):
                tensors[f"layers.{layer}.ffn.experts.{j}.w1.weight"] = fused[:inter].clone()
                tensors[f"layers.{layer}.ffn.experts.{j}.w3.weight"] = fused[inter:].clone()
        elif rest == "mlp.experts.down_proj":
            for j, down in enumerate(value):
                tensors[f"layers.{layer}.ffn.experts.{j}.w2.weight"] = down.clone()
        else:
            assert rest in V4_LAYER_NAMES, f"unmapped tensor {name}"
            tensors[f"layers.{layer}.{V4_LAYER_NAMES[rest]}"] = (
                value.to(torch.int64) if rest.endswith("tid2eid") else value
            )
    return tensors


def v4_variant_logits(spec, model, input_ids, drop=(), **overrides):
    """Logits of the same weights under the fixture's config with the keys in `drop` left out and `overrides` set."""
    settings = {k: v for k, v in spec["config"].items() if k not in drop} | overrides
    variant = type(model)(spec["config_class"](**spec["common"], **settings, attn_implementation="eager")).eval()
    variant.load_state_dict(model.state_dict())
    with torch.no_grad():
        return variant(input_ids).logits.float()


def build_v4(spec, out, model, input_ids):
    """V4 checks and files (called from build with the randomized model and its reference input)."""
    config = model.config
    assert config.qk_rope_head_dim == 8 and config.num_key_value_heads == 1
    constant = [n for n, v in model.state_dict().items() if v.numel() > 1 and v.float().std() == 0]
    assert not constant, f"not re-drawn: {constant}"
    with torch.no_grad():
        logits = model(input_ids).logits.float()
    v4_routing_checks(model, input_ids)
    swiglu_clamp_counts(model, input_ids)
    print(f"  logits: max |logit| {logits.abs().max():.3f}, std {logits.std():.3f}")
    rotary = model.model.rotary_emb
    print(
        f"  RoPE inv_freq: main {[f'{f:.4g}' for f in rotary.main_inv_freq.tolist()]}, compress "
        f"{[f'{f:.4g}' for f in rotary.compress_inv_freq.tolist()]} (cos/sin x {rotary.compress_attention_scaling})"
    )
    window_effect = (v4_variant_logits(spec, model, input_ids, sliding_window=SEQ) - logits).abs().max().item()
    print(f"  sliding-window effect: max |logits - logits(sliding_window={SEQ})| = {window_effect:.3f}")
    assert window_effect > 100 * LOGIT_TOLERANCE, "the sliding window does not matter"
    if config.rope_parameters["compress"]["rope_type"] == "yarn":
        yarn_effect = (v4_variant_logits(spec, model, input_ids, drop=("rope_scaling",)) - logits).abs().max().item()
        print(f"  YaRN effect: max |logits - logits(plain compress RoPE)| = {yarn_effect:.3f}")
        assert yarn_effect > 100 * LOGIT_TOLERANCE, "YaRN does not change the logits"

    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)  # config.json as transformers writes it; its model.safetensors is replaced below
    for extra in out.iterdir():
        if extra.name != "config.json":
            extra.unlink()
    tensors = v4_release_tensors(model)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    greedy_ids = greedy(model, input_ids)
    np.savez(
        out / "reference.npz",
        input_ids=input_ids.numpy().astype(np.int32),
        logits=logits.numpy(),
        greedy_ids=greedy_ids.numpy().astype(np.int32),
        greedy_prompt_len=np.int32(GREEDY_PROMPT),
    )
    v4_indexer_checks(model, input_ids, greedy_ids, logits)
    written = json.loads((out / "config.json").read_text())
    print(f"  config.json: {json.dumps(written, sort_keys=True)}")

    reloaded, info = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", output_loading_info=True)
    assert not any(info.values()), f"loading info not clean: {info}"
    reloaded_state, state = reloaded.state_dict(), model.state_dict()
    assert reloaded_state.keys() == state.keys()
    assert all(torch.equal(reloaded_state[n].to(v.dtype), v) for n, v in state.items()), "a tensor landed elsewhere"
    with torch.no_grad():
        diff = (reloaded.eval()(input_ids).logits - logits).abs().max().item()
    assert diff == 0, f"reloaded logits differ by {diff}"
    print(f"  reload of the release names via AutoModelForCausalLM: every tensor equal, max |logit diff| = {diff:.1e}")
    print(
        f"  {len(tensors)} tensors, files: " + ", ".join(f"{p.name} {p.stat().st_size}B" for p in sorted(out.iterdir()))
    )


def greedy(model, input_ids):
    """HF greedy generation of GREEDY_NEW tokens after the first GREEDY_PROMPT tokens of each row, never stopping
    early, and equal to the argmax of one uncached forward over the result. The all-ones attention_mask is explicit:
    without it generate() masks every prompt token equal to pad_token_id (0) as padding."""
    model.generation_config.eos_token_id = None
    prompt = input_ids[:, :GREEDY_PROMPT]
    with torch.no_grad():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=GREEDY_NEW,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
        ids = out.sequences
        logits = model(ids).logits[:, GREEDY_PROMPT - 1 : -1]
    assert ids.shape == (BATCH, GREEDY_PROMPT + GREEDY_NEW) and torch.equal(ids[:, :GREEDY_PROMPT], prompt)
    cached_diff = (torch.stack(out.logits, dim=1) - logits).abs().amax(-1)  # [BATCH, GREEDY_NEW]
    wrong = (logits.argmax(-1) != ids[:, GREEDY_PROMPT:]).nonzero().tolist()
    assert not wrong, (
        f"generate() disagrees with a full forward's argmax at (row, position) "
        f"{[(row, GREEDY_PROMPT + step) for row, step in wrong]}; cached vs uncached logits differ by up to "
        f"{cached_diff.max(0).values.tolist()} per step"
    )
    top2 = logits.topk(2, dim=-1).values
    print(
        f"  greedy: {GREEDY_NEW} tokens, smallest top-1/top-2 logit gap {(top2[..., 0] - top2[..., 1]).min():.2e}; "
        f"cached (generate) vs uncached logits: max |diff| {cached_diff.max():.1e}"
    )
    return ids


def build(spec):
    out = OUT_DIR / spec["name"]
    print(f"== {spec['name']}")
    torch.manual_seed(spec["seed"])
    gen = torch.Generator().manual_seed(spec["seed"])
    config = spec["config_class"](**spec.get("common", COMMON), **spec["config"], attn_implementation="eager")
    model = spec["model_class"](config).eval()
    is_v4 = config.model_type == "deepseek_v4"
    (randomize_v4 if is_v4 else randomize)(model, gen)

    input_ids = torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=gen)
    if is_v4:
        return build_v4(spec, out, model, input_ids)
    with torch.no_grad():
        logits = model(input_ids).logits.float()
    routing_checks(model, input_ids)
    print(f"  logits: max |logit| {logits.abs().max():.3f}, std {logits.std():.3f}")

    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    for extra in out.iterdir():
        if extra.name not in ("config.json", "model.safetensors"):
            extra.unlink()
    greedy_ids = greedy(model, input_ids)
    np.savez(
        out / "reference.npz",
        input_ids=input_ids.numpy().astype(np.int32),
        logits=logits.numpy(),
        greedy_ids=greedy_ids.numpy().astype(np.int32),
        greedy_prompt_len=np.int32(GREEDY_PROMPT),
    )
    if config.model_type == "deepseek_v32":
        indexer_checks(model, input_ids, greedy_ids, logits)
    tensors = check_hub_names(out / "model.safetensors", model)
    print(f"  config.json keys: {sorted(json.loads((out / 'config.json').read_text()))}")

    reloaded, info = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", output_loading_info=True)
    assert not any(info.values()), f"loading info not clean: {info}"
    with torch.no_grad():
        diff = (reloaded.eval()(input_ids).logits - logits).abs().max().item()
    assert diff <= 1e-6, f"reloaded logits differ by {diff}"
    print(f"  reload via AutoModelForCausalLM: max |diff| = {diff:.1e}")
    print(
        f"  {len(tensors)} tensors, files: " + ", ".join(f"{p.name} {p.stat().st_size}B" for p in sorted(out.iterdir()))
    )


def main(names=()):
    disable_progress_bar()
    unknown = set(names) - {spec["name"] for spec in FIXTURES}
    assert not unknown, f"no such fixtures: {sorted(unknown)}"
    for spec in FIXTURES:
        if not names or spec["name"] in names:
            build(spec)
    total = sum(p.stat().st_size for p in OUT_DIR.rglob("*") if p.is_file())
    print(f"total size of {OUT_DIR}: {total / 2**20:.2f} MiB")
    assert total < MAX_FIXTURE_BYTES


if __name__ == "__main__":
    main(sys.argv[1:])
