"""Compile the train step (or a decode step) for a TPU slice or GPUs without having them, and print its per-chip memory.

A config with a ``grpo:`` section plans GRPO's update instead (prompts_per_step x num_generations
rollouts of train.seq_len tokens; the reference policy in model.dtype when grpo.beta > 0).

    dsjax-aot --config configs/deepseek_v3_671b.yaml --topology v5p:8x8x8 \
        mesh.fsdp=32 mesh.expert=8 mesh.tensor=2 train.seq_len=4096 train.batch_size=256 model.remat=full
    dsjax-aot --config configs/tiny.yaml --topology h100:1 model.fp8=true
    dsjax-aot --config configs/grpo_tiny.yaml --topology v5e:2x2 mesh.fsdp=4 grpo.beta=0
    dsjax-aot --config configs/deepseek_v4_flash.yaml --topology v5p:2x2x4 --decode 1048576 \
        --decode-batch 16 mesh.data=1 mesh.expert=16      # a decode step at 1M context: cache per sequence

TPU slices need libtpu's compiler (``pip install -e ".[tpu]"``), GPUs XLA's CUDA plugin
(``pip install "jax[cuda13]"``); see ``dsjax.aot``.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax

from dsjax.aot import plan, plan_decode
from dsjax.cli import reports_errors
from dsjax.config import load_config
from dsjax.parallel.topology import GPUS, is_gpu_topology


def table(r: dict) -> str:
    mesh = " x ".join(f"{a}={n}" for a, n in r["mesh"].items())
    hbm = f"{r['hbm_gib']} GiB" if r["hbm_gib"] else "unknown"
    verdict = "fits" if r["fits"] else "does NOT fit"
    if r["step"] == "grpo":
        reference = f"reference policy in {r['reference_dtype']}" if r["beta"] else "no reference policy"
        what = f"GRPO update (beta {r['beta']}, {reference}), rollouts {r['batch_size']} x {r['seq_len']}"
    else:
        what = f"train step, batch {r['batch_size']} x {r['seq_len']}"
    title = (
        f"{r['topology']} ({r['chips']} x {r['device_kind']}), mesh {mesh}, {what}"
        f" ({r['microbatches']} microbatch(es)), remat {r['remat']},"
        f" capacity factor {r['expert_capacity_factor'] or 'dropless'}"
    )
    if "note" in r:
        return f"{title}\n  per chip: temporaries {r['temporaries_gib']:.2f} GiB of {hbm} HBM: {verdict} ({r['note']})"
    return "\n".join(
        [
            title,
            f"  per chip: arguments {r['arguments_gib']:8.2f} GiB   (parameters, optimizer state, batch)",
            f"            temporaries {r['temporaries_gib']:6.2f} GiB   (activations, gradients, buffers)",
            f"            outputs {r['outputs_not_aliased_gib']:10.2f} GiB   (not aliased to donated inputs)",
            f"            total {r['total_gib']:12.2f} GiB   of {hbm} HBM: {verdict}",
            f"  FLOPs per chip per step: analytic model {r['model_flops_per_chip']:.3e}; XLA cost analysis "
            f"{r['compiled_flops_per_chip']:.3e} (counts a layer-scan body once, Pallas kernels not at all)",
            f"  Pallas kernel calls in the step: {r['pallas_kernel_calls']}; compiled in {r['compile_s']:.0f} s",
        ]
    )


def decode_table(r: dict) -> str:
    mesh = " x ".join(f"{a}={n}" for a, n in r["mesh"].items())
    hbm = f"{r['hbm_gib']} GiB" if r["hbm_gib"] else "unknown"
    return "\n".join(
        [
            f"{r['topology']} ({r['chips']} x {r['device_kind']}), mesh {mesh}, decode step: "
            f"{r['batch_size']} sequence(s) x {r['context']:,} tokens of cache",
            f"  cache per sequence {r['cache_gib_per_sequence']:.2f} GiB"
            f" ({r['cache_bytes_per_token']:,.0f} bytes per token)",
            f"  per chip: arguments {r['arguments_gib']:8.2f} GiB   (weights, cache)",
            f"            temporaries {r['temporaries_gib']:6.2f} GiB",
            f"            total {r['total_gib']:12.2f} GiB   of {hbm} HBM: {'fits' if r['fits'] else 'does NOT fit'}",
            f"  compiled in {r['compile_s']:.0f} s",
        ]
    )


@reports_errors
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="dsjax-aot", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument(
        "--topology",
        required=True,
        help=f"TPU slice (v5e:2x2, v5p:8x8x8, v6e:16x16) or GPUs ({', '.join(GPUS)}: e.g. h100:8)",
    )
    ap.add_argument("--decode", type=int, metavar="CONTEXT", help="plan a decode step over a cache of CONTEXT tokens")
    ap.add_argument("--decode-batch", type=int, default=1, metavar="N", help="sequences decoded at once (--decode)")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON line too")
    ap.add_argument("overrides", nargs="*", help="section.key=value, e.g. mesh.expert=8 model.remat=full")
    a = ap.parse_intermixed_args(argv)
    if is_gpu_topology(a.topology):  # a host without that GPU: its runtime stays down, its compiler is used
        jax.config.update("jax_platforms", "cpu")
    cfg = load_config(a.config, a.overrides)
    if a.decode:
        r = plan_decode(cfg, a.topology, a.decode, a.decode_batch)
        print(decode_table(r))
    else:
        r = plan(cfg, a.topology)
        print(table(r))
    if a.json:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
