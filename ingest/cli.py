"""``scd ingest ...``: list converter plugins, run ingest jobs."""
from __future__ import annotations

import argparse
from typing import Any

from ingest.run_cli import add_run_parser


def register(sub: Any) -> None:
    p = sub.add_parser("ingest", help="convert raw files into shard datasets (Ray jobs)",
                       description="Convert molecules, proteins, crystals and MD trajectories into the unified "
                                   "schema with converter plugins, as Ray jobs.")
    s = p.add_subparsers(dest="ingest_cmd", required=True, metavar="COMMAND")
    c = s.add_parser("converters", help="list converter plugins (built-in and third-party)",
                     description="List every converter registered in the scd.converters entry-point group.")
    c.set_defaults(func=_converters)
    add_run_parser(s)


def _converters(args: argparse.Namespace) -> int:
    from ingest.registry import converter_version, discover

    print(f"{'name':<16}{'domain':<10}{'suffixes':<44}package")
    for name, cls in sorted(discover().items()):
        print(f"{name:<16}{cls.domain:<10}{' '.join(cls.suffixes):<44}{converter_version(name).replace('==', ' ')}")
    return 0
