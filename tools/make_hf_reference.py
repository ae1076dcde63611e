"""Regenerate the Hugging Face reference fixtures in tests/fixtures/.

Run (needs torch + transformers 5 + safetensors, no network, no downloaded weights):

    /tmp/ref/bin/python tools/make_hf_reference.py [NAME ...]     # every fixture, or only those named

For every entry of FIXTURES it builds a tiny random DeepseekV3ForCausalLM / DeepseekV2ForCausalLM /
DeepseekV32ForCausalLM from a config (all seeds fixed, so reruns write identical fixtures) and writes
tests/fixtures/<name>/ containing

    config.json        the config exactly as transformers writes it (`rope_parameters` spelling)
    model.safetensors  fp32 weights in hub naming (per-expert `mlp.experts.J.{gate,up,down}_proj.weight`)
    reference.npz      input_ids int32 [2, 24] and logits float32 [2, 24, vocab] from the eager fp32 forward;
                       greedy_ids int32 [2, 8 + 16]: HF `generate` (greedy, EOS disabled, KV cache) from the
                       first greedy_prompt_len = 8 tokens of each row

Every parameter is re-drawn (weights ~ N(0, 0.08), RMSNorm weights ~ 1 + N(0, 0.1)) and V3 routers get a
non-zero e_score_correction_bias, so no part of the model is an identity.  The script checks that the routing
quirks (correction bias, group limit) actually change expert choices and that the written experts are the
per-expert hub tensors, prints the smallest routing margin, the logit scale and the config keys, and reloads
every fixture with AutoModelForCausalLM to confirm the saved files reproduce the reference logits.  The greedy
tokens are checked against the argmax of a full (uncached) forward over the generated sequence, and the smallest
top-1 / top-2 logit gap along them is printed (how far the decode tests are from a tie).

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
"""

import copy
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    DeepseekV32Config,
    DeepseekV32ForCausalLM,
)
from transformers.utils.logging import disable_progress_bar

OUT_DIR = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
BATCH, SEQ = 2, 24
GREEDY_PROMPT, GREEDY_NEW = 8, 16
WEIGHT_STD, NORM_STD, BIAS_RANGE = 0.08, 0.1, 0.1
MAX_FIXTURE_BYTES = 5 * 2**20
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


def greedy(model, input_ids):
    """HF greedy generation of GREEDY_NEW tokens after the first GREEDY_PROMPT tokens of each row, never stopping
    early, and equal to the argmax of one uncached forward over the result."""
    model.generation_config.eos_token_id = None
    prompt = input_ids[:, :GREEDY_PROMPT]
    with torch.no_grad():
        ids = model.generate(prompt, max_new_tokens=GREEDY_NEW, do_sample=False, pad_token_id=0)
        logits = model(ids).logits[:, GREEDY_PROMPT - 1 : -1]
    assert ids.shape == (BATCH, GREEDY_PROMPT + GREEDY_NEW) and torch.equal(ids[:, :GREEDY_PROMPT], prompt)
    assert torch.equal(logits.argmax(-1), ids[:, GREEDY_PROMPT:]), "generate() disagrees with a full forward's argmax"
    top2 = logits.topk(2, dim=-1).values
    print(f"  greedy: {GREEDY_NEW} tokens, smallest top-1/top-2 logit gap {(top2[..., 0] - top2[..., 1]).min():.2e}")
    return ids


def build(spec):
    out = OUT_DIR / spec["name"]
    print(f"== {spec['name']}")
    torch.manual_seed(spec["seed"])
    gen = torch.Generator().manual_seed(spec["seed"])
    config = spec["config_class"](**COMMON, **spec["config"], attn_implementation="eager")
    model = spec["model_class"](config).eval()
    randomize(model, gen)

    input_ids = torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=gen)
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
