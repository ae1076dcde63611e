"""MoE cost must follow tokens x top-k, not the expert count.

Times one jitted forward+backward (cross-entropy) of the same model with 8 and with 64 routed
experts at the same top-k, 4096 tokens, and prints JSON with the ratio to the 8-expert baseline.
Target (core-model issue): ratio <= 1.3 on every backend.

    python -m bench.moe_scaling [--experts 8 64 256] [--impl auto|blocked|ragged_dot] [--tokens 4096]
"""

import argparse
import json
import time

import jax
import optax

from bench.common import environment
from dsjax.config import ModelConfig
from dsjax.model import build_model


def bench_config(num_experts: int, impl: str) -> ModelConfig:
    return ModelConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=768,
        moe_intermediate_size=128,
        num_hidden_layers=2,
        first_k_dense_replace=0,
        num_attention_heads=4,
        q_lora_rank=128,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=num_experts,
        n_shared_experts=1,
        num_experts_per_tok=6,
        n_group=1,
        topk_group=1,
        num_nextn_predict_layers=0,
        initializer_range=0.02,
        moe_impl=impl,
    )


def time_step(cfg: ModelConfig, batch: int, seq: int, repeats: int) -> float:
    model = build_model(cfg)
    tokens = jax.random.randint(jax.random.key(1), (batch, seq), 0, cfg.vocab_size)
    variables = jax.jit(model.init)(jax.random.key(0), tokens)
    params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}

    def loss(params):
        logits = model.apply({"params": params, **rest}, tokens).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

    step = jax.jit(jax.value_and_grad(loss))
    jax.block_until_ready(step(params))  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(step(params))
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--impl", default="auto", choices=["auto", "blocked", "ragged_dot"])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    batch = a.tokens // a.seq
    ms = {e: 1e3 * time_step(bench_config(e, a.impl), batch, a.seq, a.repeats) for e in a.experts}
    base = ms[a.experts[0]]
    print(
        json.dumps(
            {
                "benchmark": "moe_scaling",
                **environment(),
                "impl": a.impl,
                "tokens": a.tokens,
                "top_k": 6,
                "fwd_bwd_ms": {str(e): round(t, 1) for e, t in ms.items()},
                "baseline": f"{a.experts[0]} experts",
                "ratio_to_baseline": {str(e): round(t / base, 3) for e, t in ms.items()},
                "target_ratio_64_vs_8": 1.3,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
