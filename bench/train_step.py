"""Training throughput: tokens/s and model FLOPs utilization of the real train step.

Times ``dsjax.train.step.make_train_step`` (forward, backward, AdamW, bias update) on synthetic tokens,
on the mesh from the config, and prints JSON with tokens/s and MFU = analytic training FLOPs per
token (``dsjax.model.params``: 6 x activated matmul parameters + causal attention) x tokens/s / (devices x
the chip's dense bf16 peak). Baseline: the 35% MFU target (on an H100).

    python -m bench.train_step --config configs/deepseek_v2_lite.yaml model.num_hidden_layers=8 \
        train.seq_len=4096 train.batch_size=4 model.dtype=bfloat16 [model.fp8=true] [--steps 10]
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp

from bench.common import environment
from dsjax.config import load_config
from dsjax.model import build_model, training_flops_per_token
from dsjax.parallel.mesh import check_divisible, make_mesh
from dsjax.parallel.rules import batch_sharding
from dsjax.train.step import init_state_sharded, make_train_step, state_shardings

# Dense bf16 peak FLOP/s per device, by jax device_kind (vendor figures).
PEAK = {
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H200": 989e12,
    "TPU v5": 459e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v5 lite": 197e12,
    "TPU v4": 275e12,
}
TARGET_MFU = 0.35


def peak_flops(kind: str) -> float | None:
    return next((v for k, v in PEAK.items() if kind.startswith(k)), None)


def measure(cfg, steps: int, warmup: int) -> dict:
    t = cfg.train
    mesh = make_mesh(cfg.mesh)
    check_divisible(mesh, cfg.model, t.batch_size // t.microbatches)
    model = build_model(cfg.model)
    state_sh, batch_sh = state_shardings(cfg, model, mesh), batch_sharding(mesh)
    state = init_state_sharded(cfg, model, mesh, jax.random.key(0), state_sh)
    with jax.set_mesh(mesh):
        tokens = jax.random.randint(jax.random.key(1), (t.batch_size, t.seq_len), 0, cfg.model.vocab_size)
        batch = jax.device_put(
            {
                "tokens": tokens,
                "segment_ids": jnp.ones_like(tokens),
                "positions": jnp.broadcast_to(jnp.arange(t.seq_len), tokens.shape),
            },
            batch_sh,
        )
        step = jax.jit(
            make_train_step(cfg, model),
            in_shardings=(state_sh, batch_sh),
            out_shardings=(state_sh, None),
            donate_argnums=0,
        )
        start = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - start
        for _ in range(warmup):
            state, m = step(state, batch)
        jax.block_until_ready(m)
        start = time.perf_counter()
        for _ in range(steps):
            state, m = step(state, batch)
        jax.block_until_ready(m)
        dt = (time.perf_counter() - start) / steps
    tokens_per_s = t.batch_size * t.seq_len / dt
    flops = training_flops_per_token(cfg.model, t.seq_len)
    peak = peak_flops(jax.devices()[0].device_kind)
    mfu = flops * tokens_per_s / (peak * mesh.size) if peak else None
    return {
        "step_s": dt,
        "tokens_per_s": tokens_per_s,
        "model_tflops_per_s": flops * tokens_per_s / 1e12,
        "flops_per_token": flops,
        "peak_tflops_per_device": peak / 1e12 if peak else None,
        "mfu": mfu,
        "ratio_to_baseline": mfu / TARGET_MFU if mfu is not None else None,
        "baseline": f"MFU {TARGET_MFU:.0%}",
        "compile_and_first_step_s": compile_s,
        "loss": float(m["loss"]),
        "mesh": dict(mesh.shape),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_intermixed_args(argv)
    cfg = load_config(a.config, a.overrides)
    m = cfg.model
    result = {
        **environment(),
        "benchmark": "train_step",
        "config": a.config,
        "overrides": a.overrides,
        "batch_size": cfg.train.batch_size,
        "seq_len": cfg.train.seq_len,
        "dtype": m.dtype,
        "fp8": m.fp8,
        "remat": m.remat,
        **measure(cfg, a.steps, a.warmup),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
