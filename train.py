"""Pre-train a DeepSeek-V3-style model: ``python train.py [--config CONFIG.yaml] [section.key=value ...]``.

The same command as ``dsjax-train``; the loop itself is ``dsjax.train.loop.train``.
"""

import sys

from dsjax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
