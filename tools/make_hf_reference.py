"""Regenerate the Hugging Face reference fixtures in tests/fixtures/.

Run (needs torch + transformers 5 + safetensors, no network, no downloaded weights):

    /tmp/ref/bin/python tools/make_hf_reference.py

For every entry of FIXTURES it builds a tiny random DeepseekV3ForCausalLM / DeepseekV2ForCausalLM from a config
(all seeds fixed, so reruns write identical fixtures) and writes tests/fixtures/<name>/ containing

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
"""

import json
import shutil
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
)
from transformers.utils.logging import disable_progress_bar

OUT_DIR = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
BATCH, SEQ = 2, 24
GREEDY_PROMPT, GREEDY_NEW = 8, 16
WEIGHT_STD, NORM_STD, BIAS_RANGE = 0.08, 0.1, 0.1
MAX_FIXTURE_BYTES = 5 * 2**20

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
]


def randomize(model, gen):
    """Redraw every parameter (and V3 correction biases) from seeded distributions."""
    with torch.no_grad():
        for module in model.modules():
            is_norm = type(module).__name__.endswith("RMSNorm")
            for param in module.parameters(recurse=False):
                noise = torch.randn(param.shape, generator=gen)
                param.copy_(1.0 + NORM_STD * noise if is_norm else WEIGHT_STD * noise)
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
        if config.model_type == "deepseek_v3":
            assert torch.equal(tensors[f"{prefix}.gate.e_score_correction_bias"], mlp.gate.e_score_correction_bias)
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
    np.savez(
        out / "reference.npz",
        input_ids=input_ids.numpy().astype(np.int32),
        logits=logits.numpy(),
        greedy_ids=greedy(model, input_ids).numpy().astype(np.int32),
        greedy_prompt_len=np.int32(GREEDY_PROMPT),
    )
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


def main():
    disable_progress_bar()
    for spec in FIXTURES:
        build(spec)
    total = sum(p.stat().st_size for p in OUT_DIR.rglob("*") if p.is_file())
    print(f"total size of {OUT_DIR}: {total / 2**20:.2f} MiB")
    assert total < MAX_FIXTURE_BYTES


if __name__ == "__main__":
    main()
