"""Tools on shard datasets: the ``scd`` command line and its ``shards`` group (verify, inspect, report,
preview, keys, export, compact) and the README's schema table (``python -m shards.tools.doc``).
Each tool is a thin layer over :mod:`shards.format` and :mod:`shards.stream`.
"""
from __future__ import annotations

from shards.tools.cli import main
from shards.tools.compact import compact
from shards.tools.export import export_sample
from shards.tools.keys import iter_keys

__all__ = ["compact", "export_sample", "iter_keys", "main"]
