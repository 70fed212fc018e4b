"""``torchrun -m scd_train train CONFIG.yaml [--set k=v ...]``: the same commands as ``scd``."""
from __future__ import annotations

import sys

from shards.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
