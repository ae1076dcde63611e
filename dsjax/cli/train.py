"""Pre-train a DeepSeek-V3-style model (MLA + MoE + MTP).

    dsjax-train                                       # configs/tiny.yaml on the standard library
    dsjax-train --config configs/small.yaml data.paths='[my/*.txt]' train.steps=5000
    dsjax-train --resume                              # continue runs/<name>/ from its newest checkpoint
    dsjax-train mesh.fsdp=4 mesh.expert=2             # any mesh of the devices (dsjax.parallel)
    dsjax-train --distributed ...                     # one process per host: jax.distributed
    dsjax-train --config configs/grpo_tiny.yaml       # R1's recipe: cold-start SFT, then GRPO (dsjax.rl)

(``python train.py`` and ``python -m dsjax.cli.train`` are the same command.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dsjax.cli import UsageError, reports_errors
from dsjax.config import load_config
from dsjax.parallel.distributed import initialize, launched
from dsjax.rl.recipe import post_train
from dsjax.train.loop import train

# The repository's configs/ (an editable install): the default config from any working directory.
REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def default_config() -> Path:
    local = Path("configs") / "tiny.yaml"
    return local if local.is_file() else REPO_CONFIGS / "tiny.yaml"


@reports_errors
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="dsjax-train", description=__doc__.split("\n")[0])
    ap.add_argument("--config", help="YAML run config (default: configs/tiny.yaml)")
    ap.add_argument("--resume", action="store_true", help="continue the run's newest checkpoint")
    ap.add_argument(
        "--distributed",
        action="store_true",
        help="multi-host: call jax.distributed.initialize() (cluster settings auto-detected)",
    )
    ap.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=100")
    a = ap.parse_intermixed_args(argv)
    if a.distributed or launched():
        initialize()
    cfg = load_config(a.config or default_config(), a.overrides)
    if cfg.sft or cfg.grpo:
        if a.resume:
            raise UsageError("--resume: post-training runs (sft / grpo sections) do not resume yet")
        return report_post_training(post_train(cfg))
    try:
        last = train(cfg, resume=a.resume)
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once
        print("error: interrupted", file=sys.stderr)
        return 130
    if "stopped_by" in last:
        print(f"stopped by {last['stopped_by']} at step {last['step']} (checkpoint saved; --resume continues)")
    elif "val_bpb" in last:
        print(f"done: validation {last['val_loss']:.4f} nats/token, {last['val_bpb']:.3f} bits per byte")
    return 0


def report_post_training(result: dict) -> int:
    if "before" in result:
        after = f" -> {result['after']:.3f} after GRPO" if "after" in result else " after SFT"
        print(f"held-out accuracy: {result['before']:.3f}{after}")
    print(f"done in {result['seconds']:.0f} s: {result['directory']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
