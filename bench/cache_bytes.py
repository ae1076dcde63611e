"""Decode-cache bytes per token at long context: DeepSeek-V4's per-layer-type caches beside V3's latent.

    python -m bench.cache_bytes [--contexts 131072 1048576]

For each config (configs/deepseek_v3_671b.yaml, configs/deepseek_v32_671b.yaml,
configs/deepseek_v4_flash.yaml; cache in bf16, one sequence, the main model's layers, MTP aside) the
cache ``init_cache`` builds for a sequence of that many tokens, from its shapes (nothing allocated):
total bytes per sequence and per token, and per token per layer. V3 keeps 576 values per token per
layer (the 512-value latent + the 64-value RoPE key); V3.2 adds the indexer's 128-value key; V4 keeps
a sliding window (a constant), and per CSA layer (head_dim + index_head_dim) / 4 values per token, per
HCA layer head_dim / 128. ``ratio_to_v3``: V3's bytes per token / this config's. Prints one JSON object.
"""

import argparse
import json
import sys
from pathlib import Path

import jax

from bench.common import environment
from dsjax.config import load_config
from dsjax.model.transformer import init_cache

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("deepseek_v3_671b", "deepseek_v32_671b", "deepseek_v4_flash")


def cache_bytes(name: str, context: int) -> dict:
    cfg = load_config(ROOT / "configs" / f"{name}.yaml", ["model.dtype=bfloat16"]).model
    cache = jax.eval_shape(lambda: init_cache(cfg, 1, context))
    total = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))
    return {
        "layers": cfg.num_hidden_layers,
        "gib_per_sequence": total / 2**30,
        "bytes_per_token": total / context,
        "bytes_per_token_per_layer": total / context / cfg.num_hidden_layers,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[131072, 1048576])
    a = ap.parse_args(argv)
    results = {}
    for context in a.contexts:
        row = {name: cache_bytes(name, context) for name in CONFIGS}
        for r in row.values():
            r["ratio_to_v3"] = row["deepseek_v3_671b"]["bytes_per_token"] / r["bytes_per_token"]
        results[str(context)] = row
    print(json.dumps({**environment(), "benchmark": "cache_bytes", "contexts": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
