"""Generate text from a training run or a hub checkpoint, decoding from MLA's latent cache.

    dsjax-generate --checkpoint runs/tiny --prompt "def " --max-new-tokens 200 --temperature 0.8 --top-k 20
    dsjax-generate --checkpoint runs/tiny --prompt "import " --speculative     # MTP drafts, same output
    dsjax-generate --checkpoint path/to/DeepSeek-V3 --prompt-ids 0,1,2 --fp8-weights

Prints the text (or token ids without a tokenizer) on stdout and the decoding statistics as one
JSON line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax

from dsjax.cli import UsageError, reports_errors
from dsjax.infer.generate import generate
from dsjax.train.checkpoint import load_checkpoint


@reports_errors
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dsjax-generate", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="training run directory or hub-format HF directory")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text (needs the checkpoint's tokenizer)")
    src.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 1,2,3")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--speculative", action="store_true", help="draft with the MTP modules")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--fp8-weights",
        action="store_true",
        help="FP8 inference: projections in e4m3 + 128x128 block scales (an FP8 release's own bytes)",
    )
    a = ap.parse_args(argv)
    cfg, variables, tok = load_checkpoint(a.checkpoint, a.fp8_weights)
    if a.prompt_ids is not None:
        try:
            ids = [int(t) for t in a.prompt_ids.split(",")]
        except ValueError:
            raise UsageError(f"--prompt-ids {a.prompt_ids!r}: expected comma-separated integers") from None
    elif tok is None:
        raise UsageError(f"--checkpoint {a.checkpoint} has no tokenizer.json: pass --prompt-ids")
    else:
        ids = ([] if tok.bos_id is None else [tok.bos_id]) + tok.encode(a.prompt.encode()).tolist()
    try:
        out = generate(cfg, variables, [ids], a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                       top_p=a.top_p, eos_id=None if tok is None else tok.eos_id, rng=jax.random.key(a.seed),
                       speculative=a.speculative)  # fmt: skip
    except ValueError as e:  # generate's own checks of its arguments
        raise UsageError(str(e)) from None
    new = out.tokens[0, : out.lengths[0]].tolist()
    print(a.prompt + tok.decode(new) if tok is not None and a.prompt is not None else ",".join(map(str, new)))
    print(json.dumps(out.stats), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
