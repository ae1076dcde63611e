"""Check or re-export a hub checkpoint (config.json + safetensors).

dsjax-convert SRC                                 # check SRC against its config from the file headers
dsjax-convert SRC DST [--dtype bfloat16] [--fp8]  # re-export it (tokenizer and other files copied along)
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from dsjax.cli import reports_errors
from dsjax.hf import load_hf, save_hf, summary


@reports_errors
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dsjax-convert", description=__doc__.split("\n")[0])
    ap.add_argument("src", help="hub checkpoint directory (config.json + *.safetensors)")
    ap.add_argument("dst", nargs="?", help="write the re-exported checkpoint here (omit: check SRC and summarise)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="param dtype to write (default: SRC's)")
    ap.add_argument(
        "--fp8",
        action="store_true",
        help="write the FP8 release layout (an FP8 SRC's own bytes, else quantized): V3's e4m3 projections + "
        "128x128 weight_scale_inv; V4's e4m3 + UE8M0 .scale blocks with FP4 (MXFP4) routed experts",
    )
    ap.add_argument("--max-shard-gib", type=float, default=5.0)
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    a = ap.parse_args(argv)
    if a.dst is None:
        print(summary(a.src))
        return 0
    cfg, variables = load_hf(a.src, **({"param_dtype": a.dtype} if a.dtype else {}), fp8_weights=a.fp8)
    save_hf(a.dst, cfg, variables, max_shard_bytes=int(a.max_shard_gib * 2**30), overwrite=a.overwrite)
    # Tokenizer, generation config & co. travel along; weights and config.json were just written.
    for f in Path(a.src).iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(f, Path(a.dst) / f.name)
    print(summary(a.dst))
    return 0


if __name__ == "__main__":
    sys.exit(main())
