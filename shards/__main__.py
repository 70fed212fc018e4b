"""``python -m shards <command> ...``: the ``scd`` command line without the console script."""
from __future__ import annotations

import sys

from shards.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
