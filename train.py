"""dsjax training entry point.

Training (data pipeline, optimizer, checkpoints, aux-loss-free balancing) is not built yet: it
lands with the training issue. Until then this script checks the install end to end: it builds
the model of ``--config`` (default configs/tiny.yaml), prints its parameter counts, runs one
forward pass with the loss the trainer will minimise, and says what is missing.

    python train.py [--config configs/tiny.yaml] [model.key=value ...]
"""

import argparse
import sys

import jax
import jax.numpy as jnp
import optax

from dsjax import ConfigError, Transformer, count_params, load_config


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("overrides", nargs="*", help="model.key=value")
    a = ap.parse_args(argv)
    try:
        cfg = load_config(a.config, a.overrides).model
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = count_params(cfg)
    print(f"{a.config}: {counts['total']:,} parameters ({counts['activated']:,} activated per token)")

    model = Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 64), 0, cfg.vocab_size)
    variables = jax.jit(model.init)(jax.random.key(1), tokens)
    out = jax.jit(model.apply)(variables, tokens)
    ce = optax.softmax_cross_entropy_with_integer_labels(out.logits[:, :-1], tokens[:, 1:]).mean()
    print(f"forward OK on {jax.default_backend()}: next-token loss {float(ce):.3f} at init "
          f"(ln vocab = {float(jnp.log(cfg.vocab_size)):.3f})")
    print("Training is not implemented yet: it arrives with the training issue (train.py, grain data, "
          "AdamW, orbax checkpoints).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
