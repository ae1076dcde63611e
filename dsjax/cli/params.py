"""Print a model's parameter counts, from the real module shapes (nothing is allocated).

dsjax-params configs/deepseek_v3_671b.yaml            # a YAML run config
dsjax-params path/to/config.json model.num_nextn_predict_layers=0   # or an HF config.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from dsjax.cli import reports_errors
from dsjax.config import ModelConfig, apply_overrides, load_config
from dsjax.hf.config import from_hf_config
from dsjax.model.params import count_params


def human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


@reports_errors
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dsjax-params", description=__doc__.split("\n")[0])
    ap.add_argument("config", help="YAML config (configs/*.yaml) or an HF config.json")
    ap.add_argument("overrides", nargs="*", help="section.key=value, e.g. model.hidden_size=256")
    a = ap.parse_args(argv)
    if a.config.endswith(".json"):
        hf = {"model": dataclasses.asdict(from_hf_config(a.config))}
        cfg = ModelConfig.from_dict(apply_overrides(hf, a.overrides)["model"])
    else:
        cfg = load_config(a.config, a.overrides).model
    counts = count_params(cfg)
    print(json.dumps(counts, indent=2))
    print(
        f"total {human(counts['total'])} (main {human(counts['main'])} + MTP {human(counts['mtp'])}), "
        f"activated per token {human(counts['activated'])} (main model)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
