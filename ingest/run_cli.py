"""``scd ingest run``: run an ingest job file (or one domain given by flags) on Ray."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from ingest.job import JobConfig, SourceSpec, load_job
from shards.format.storage import is_url, join


def add_run_parser(sub: Any) -> None:
    p = sub.add_parser("run", help="convert inputs into a shard dataset with Ray",
                       description="Run an ingest job: plan work units (groups of small files up to unit_bytes / "
                                   "files_per_unit, record/frame ranges of big files), convert them on Ray "
                                   "(embedded local Ray, or the cluster in RAY_ADDRESS), write shards (short unit "
                                   "tails packed into target-size shards), the rejects file, the accounting summary, "
                                   "the zarr index and the manifest. One job per output folder (a lock); re-running "
                                   "skips completed units.")
    p.add_argument("job", nargs="?", type=Path, help="job YAML (its keys: docs/ingest.md, 'The job file')")
    p.add_argument("--domain", help="flag form: the domain of --input files (converter chosen by suffix)")
    p.add_argument("--input", nargs="+", default=[], help="flag form: input files or globs (paths or URLs)")
    p.add_argument("--out", help="output dataset folder or object-storage URL such as s3://bucket/prefix "
                                 "(overrides the job's output)")
    p.add_argument("--source", help="flag form: source name (default: the domain)")
    p.add_argument("--converter", default="auto", help="flag form: converter name (default: by suffix)")
    p.add_argument("--workers", type=int, help="units in parallel (default: the job's, else all CPUs)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a job key, e.g. --set writer.max_shard_samples=1000")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run_command)


def job_from_args(args: argparse.Namespace) -> JobConfig:
    if args.job is not None:
        cfg = load_job(args.job, args.overrides)
        if args.out:
            cfg = dataclasses.replace(cfg, output=_location(args.out))
        return cfg
    if not (args.domain and args.input and args.out):
        raise ValueError("give a job file, or --domain D --input PATH... --out DIR")
    spec = SourceSpec(source=args.source or args.domain, paths=tuple(_location(p) for p in args.input),
                      converter=args.converter, domain=args.domain)
    return JobConfig(output=_location(args.out), sources=(spec,))


def _location(path: str) -> str:
    """A URL verbatim (``s3://b/x`` must never become a local folder ``s3:/b/x``), a local path made absolute."""
    return path if is_url(path) else str(Path(path).resolve())


def run_command(args: argparse.Namespace) -> int:
    from ingest.run import REJECTS, print_table, result_dict, run_job

    result = run_job(job_from_args(args), workers=args.workers, progress=not args.no_progress)
    if args.json:
        print(json.dumps(result_dict(result), indent=1))
    else:
        print_table(result)
    total = result.accounting.get("total", {})
    if result.ok and total.get("inputs", 0) > 0 and total.get("accepted", 0) == 0:
        print(f"error: none of the {total['inputs']} input records was accepted; the reasons are in "
              f"{join(result.output, REJECTS)}")
        return 1
    if not result.ok:
        print(f"error: {len(result.failed)} unit(s) failed: {', '.join(f['unit'] for f in result.failed)}; "
              "fix the cause and re-run the same command to finish the rest")
        return 1
    return 0
