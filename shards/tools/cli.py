"""The ``scd`` command line. Subcommand groups are plugins in the ``scd.commands`` entry-point group,
so ``shards`` needs neither ``ingest`` nor ``scd_train`` to build the parser."""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from shards.format.audit import inspect_dataset, verify_dataset
from shards.format.writer import WriterConfig
from shards.tools import preview, report
from shards.tools.export import EXPORT_FORMATS, export_sample

COMMAND_GROUP = "scd.commands"


def register(sub: Any) -> None:
    """Add ``scd shards ...``."""
    p = sub.add_parser("shards", help="verify, inspect and export shard datasets",
                       description="Work with shard datasets (manifest.json + tar shards + indices).")
    s = p.add_subparsers(dest="shards_cmd", required=True, metavar="COMMAND")
    v = s.add_parser("verify", help="check checksums, index/tar agreement and every sample",
                     description="Check every shard's sha256 and size, that each tar agrees with its index, "
                                 "that every sample decodes and validates, and the zarr index. Exit 0 when sound.")
    v.add_argument("dataset", help="dataset folder or URL (http(s)://, s3://, gs://, az://)")
    v.set_defaults(func=_verify)
    i = s.add_parser("inspect", help="counts per domain/source, atoms per sample, bytes",
                     description="Summarise a dataset from its manifest and zarr index.")
    i.add_argument("dataset")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.set_defaults(func=_inspect)
    e = s.add_parser("export", help="write one sample as extxyz, cif or pdb",
                     description="Write the sample KEY in a format that ASE and pymatgen open.")
    e.add_argument("dataset")
    e.add_argument("key")
    e.add_argument("--format", choices=sorted(EXPORT_FORMATS), default="extxyz")
    e.add_argument("--out", type=Path, help="output file (default: KEY.<ext> in the current folder)")
    e.set_defaults(func=_export)
    c = s.add_parser("compact", help="rewrite datasets into target-size shards",
                     description="Copy every sample of one or more datasets, verbatim and in order (sources as "
                                 "given, shards in manifest order), into one dataset of target-size shards. "
                                 "Every shard read is checked against its manifest; the sources' accounting and "
                                 "provenance are kept in the new manifest under compacted_from.")
    c.add_argument("sources", nargs="+", help="dataset folders or URLs")
    c.add_argument("--out", required=True, help="new (or empty) output folder or object-storage URL")
    c.add_argument("--max-shard-bytes", type=int, default=WriterConfig().max_shard_bytes)
    c.add_argument("--max-shard-samples", type=int, default=WriterConfig().max_shard_samples)
    c.set_defaults(func=_compact)
    k = s.add_parser("keys", help="list sample keys (for export), optionally of one domain",
                     description="Print the sample keys of a dataset, one per line, in dataset order, read "
                                 "from the shard indices.")
    k.add_argument("dataset")
    k.add_argument("--domain", help="only keys of this domain (molecule, protein, crystal, md, ...)")
    k.add_argument("--limit", type=int, help="at most this many keys (default: all)")
    k.set_defaults(func=_keys)
    preview.add_parser(s)
    report.add_parser(s)


def _verify(args: argparse.Namespace) -> int:
    from shards.format.reader import ShardDataset
    from shards.progress import Progress

    total = len(ShardDataset(args.dataset).shard_names)
    with Progress(total, "verify", "shard") as bar:
        rep = verify_dataset(args.dataset, progress=bar)
    for err in rep.errors:
        print(f"ERROR: {err}", file=sys.stderr)
    status = "OK" if rep.ok else f"FAILED ({len(rep.errors)} problem(s))"
    print(f"{args.dataset}: {rep.n_shards} shards, {rep.n_samples} samples verified: {status}")
    return 0 if rep.ok else 1


def _inspect(args: argparse.Namespace) -> int:
    info = inspect_dataset(args.dataset)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"{info['root']}: schema {info['schema_version']}, {info['samples']} samples, {info['shards']} shards, "
          f"{info['bytes'] / 1e6:.2f} MB")
    header = f"{'':<10}{'name':<24}{'samples':>10}{'atoms':>12}{'min':>7}{'median':>9}{'max':>8}"
    print(header)
    for kind in ("domains", "sources"):
        for name, st in info[kind].items():
            print(f"{kind[:-1]:<10}{name:<24}{st['samples']:>10}{st['atoms']:>12}{st['min_atoms']:>7}"
                  f"{st['median_atoms']:>9.1f}{st['max_atoms']:>8}")
    sz = info["shard_sizes"]
    if sz["shards"]:
        b, n = sz["bytes"], sz["samples"]
        print(f"shard sizes: {sz['shards']} shards (fewest the targets allow: {sz['minimum']}), "
              f"MB min/median/max {b['min'] / 1e6:.2f}/{b['median'] / 1e6:.2f}/{b['max'] / 1e6:.2f}, "
              f"samples {n['min']}/{n['median']}/{n['max']}; target {sz['max_shard_bytes'] / 1e6:.1f} MB or "
              f"{sz['max_shard_samples']} samples; {sz['under_half_target']} under half the target")
        print("shard fill: " + ", ".join(f"{k} {v}" for k, v in sz["fill_histogram"].items() if v))
    return 0


def _compact(args: argparse.Namespace) -> int:
    from shards.tools.compact import compact

    cfg = WriterConfig(max_shard_bytes=args.max_shard_bytes, max_shard_samples=args.max_shard_samples)
    m = compact(args.sources, args.out, config=cfg)
    print(f"{args.out}: {m['n_samples']} samples from {len(args.sources)} dataset(s) in {len(m['shards'])} shards")
    return 0


def _keys(args: argparse.Namespace) -> int:
    from shards.tools.keys import iter_keys

    try:
        for key in iter_keys(args.dataset, domain=args.domain, limit=args.limit):
            print(key)
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. `scd shards keys DIR | head`
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silences the flush at exit
    return 0


def _export(args: argparse.Namespace) -> int:
    out = export_sample(args.dataset, args.key, args.format, args.out)
    print(out)
    return 0


class DefaultsParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose ``--help`` states every argument's default (subcommand parsers inherit it).

    ``(default: X)`` is appended to the help of each argument with a default other than None or empty, unless
    the help already names its default; store_true/store_false flags are left alone.
    """

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        helptext = action.help or ""
        flag = action.nargs == 0  # store_true/store_false/store_const: the default is the flag's absence
        if (action.default not in (None, argparse.SUPPRESS, [], ()) and not flag
                and helptext != argparse.SUPPRESS and "default" not in helptext):
            action.help = f"{helptext} (default: %(default)s)".lstrip()
        return action


def build_parser(groups: list[tuple[str, Callable[[Any], None]]] | None = None) -> argparse.ArgumentParser:
    """The parser with every registered command group (``groups`` overrides discovery, for tests)."""
    parser = DefaultsParser(
        prog="scd", description="Multi-domain data layer and trainer for Self-Conditioned Denoising (SCD) "
                                "pretraining of atomistic GNNs: ingest, shards, pretrain, fine-tune.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=DefaultsParser)
    if groups is None:
        groups = []
        for ep in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
            try:
                groups.append((ep.name, ep.load()))
            except ImportError as exc:
                groups.append((ep.name, _missing(ep.name, exc)))
    for _, reg in groups:
        reg(sub)
    return parser


def _missing(name: str, exc: ImportError) -> Callable[[Any], None]:
    def reg(sub: Any) -> None:
        p = sub.add_parser(name, help=f"(unavailable: {exc.name} is not installed)")
        p.set_defaults(func=lambda _a: _fail(f"scd {name}: needs {exc.name}; install with "
                                             f"pip install 'scd-atoms[all]'"))
    return reg


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``scd`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        hint = getattr(args, "on_interrupt", None)
        message = hint(args) if hint is not None else f"scd {args.command}: interrupted"
        if message:
            print(f"\n{message}", file=sys.stderr, flush=True)
        return 130
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
