"""Run an ingest job on Ray: embedded local Ray by default, a cluster when RAY_ADDRESS is set."""
from __future__ import annotations

import json
import os
import re
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ingest.job import JobConfig, Mapper, Unit, job_summary_config, plan_units
from ingest.outcome import UnitOutcome
from ingest.spool import forget_cached
from ingest.target import BucketTarget, FolderTarget
from shards.config import ConfigError
from shards.format.storage import FetchError, is_url, join

REJECTS = "rejects.jsonl"
SUMMARY = "ingest_summary.json"
MIN_IN_FLIGHT = 64
IN_FLIGHT_PER_CPU = 2


@dataclass
class JobResult:
    """What a job did: per-unit outcomes, failures with tracebacks, and the accounting."""

    output: str
    units: int
    skipped: int
    failed: list[dict[str, Any]] = field(default_factory=list)
    accounting: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    plan_seconds: float = 0.0
    shards: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed


def _init_ray(workers: int | None) -> Any:
    import ray

    from ingest.rayenv import embedded_ray_env

    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"logging_level": "WARNING"}
        if not os.environ.get("RAY_ADDRESS"):
            # "local": never attach to a cluster someone else started on this machine with `ray start`
            kwargs.update(address="local", include_dashboard=False)
            embedded_ray_env()
            if workers:
                kwargs["num_cpus"] = workers
        ray.init(**kwargs)
    return ray


def ray_mapper(workers: int | None) -> Mapper:
    """Run planning batches (sniffing, record counting) as Ray tasks; results in batch order. On a cluster
    with no CPU yet (a CPU-0 head before its autoscaler adds nodes) the batches run in the driver instead,
    so that the units can be queued as demand; the plan is the same either way."""
    def mapper(fn: Any, batches: list[list[Any]]) -> list[list[Any]]:
        if not batches:
            return []
        ray = _init_ray(workers)
        if not ray.cluster_resources().get("CPU"):
            return [fn(b) for b in batches]
        task = ray.remote(num_cpus=1)(fn)
        return list(ray.get([task.remote(b) for b in batches]))
    return mapper


def run_job(cfg: JobConfig, *, workers: int | None = None, progress: bool = True) -> JobResult:
    """Plan, run pending units on Ray with bounded work in flight, pack the units' short tail shards into
    target-size shards, then write indices and manifest. The output is a folder (one job at a time: a lock;
    temporary files removed before and after) or an object-storage URL (:class:`~ingest.target.BucketTarget`)."""
    location = cfg.output_location()
    target: FolderTarget | BucketTarget = BucketTarget(location) if is_url(location) else FolderTarget(Path(location))
    try:
        with target.hold():
            try:
                return _run_locked(cfg, target, workers, progress)
            except OSError as exc:
                if exc.filename is not None or isinstance(exc, FetchError):
                    raise
                raise OSError(exc.errno, f"{exc.strerror or exc} (writing {location})") from exc
    except ConfigError:
        target.discard()  # a job that failed its configuration leaves no output folder behind
        raise


def _run_locked(cfg: JobConfig, target: FolderTarget | BucketTarget, workers: int | None,
                progress: bool) -> JobResult:
    t0 = time.perf_counter()
    mapper = ray_mapper(workers or cfg.workers)
    units = plan_units(cfg, mapper)  # a job that fails its configuration leaves an existing dataset as it was
    plan_seconds = time.perf_counter() - t0
    target.begin()
    target.remove_stale({u.prefix for u in units})
    outcomes = target.completed_units(units, mapper)
    pending = [u for u in units if u.number not in outcomes]
    skipped = len(outcomes)
    failed: list[dict[str, Any]] = []
    if pending:
        failed = _execute(pending, cfg, target.location, outcomes, workers or cfg.workers, progress, skipped,
                          len(units))
    result = JobResult(target.location, len(units), skipped, failed, plan_seconds=plan_seconds)
    result.accounting = _account([outcomes[u.number] for u in units if u.number in outcomes])
    _write_reports(target, units, outcomes, result)
    if result.ok:
        done_list = [outcomes[u.number] for u in units]
        packed = target.pack_tails(done_list, cfg.writer)
        shards = [s for o in done_list for s in o.shards] + packed
        result.shards = len(shards)
        converters = {f"{name} ({version})" for o in outcomes.values() for name, version in o.converters.items()}
        target.tidy(done_list, packed)
        target.finalize(shards, cfg.writer, {"ingest": job_summary_config(cfg), "accounting": result.accounting,
                                             "converters": sorted(converters)})
        forget_cached({(i.path, i.remote) for u in units for i in u.items if i.remote})
    result.seconds = time.perf_counter() - t0
    return result


def _execute(pending: list[Unit], cfg: JobConfig, out: str, outcomes: dict[int, UnitOutcome],
             workers: int | None, progress: bool, skipped: int, total: int) -> list[dict[str, Any]]:
    from ingest.unit import run_unit
    from shards.progress import Progress

    ray = _init_ray(workers)
    task = ray.remote(num_cpus=1, max_retries=cfg.max_retries, retry_exceptions=True)(run_unit)
    in_flight: dict[Any, Unit] = {}
    queue = list(pending)
    failed: list[dict[str, Any]] = []
    records = 0
    bar = Progress(total, "ingest", "unit", initial=skipped, enabled=progress)  # plain lines when not a terminal
    t0 = time.perf_counter()
    while queue or in_flight:
        limit = in_flight_limit(ray, workers)
        while queue and len(in_flight) < limit:
            u = queue.pop(0)
            in_flight[task.remote(u, out, cfg.writer, cfg.spool_bytes)] = u
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        for ref in ready:
            u = in_flight.pop(ref)
            try:
                res = ray.get(ref)
                outcomes[u.number] = res
                records += res.inputs
            except Exception as exc:  # noqa: BLE001 - the unit is recorded as failed, others finish
                failed.append({"unit": u.prefix, "file": u.describe(), "files": len(u.items),
                               "attempts": cfg.max_retries + 1, "error": _error_text(exc)})
            bar.update(1)
            rate = records / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(records=records, rec_s=f"{rate:,.0f}", failed=len(failed))
    bar.close()
    return sorted(failed, key=lambda f: f["unit"])


def in_flight_limit(ray: Any, workers: int | None) -> int:
    """Units kept submitted. With the job's ``workers`` set (a cluster launcher passes the cluster's maximum CPUs):
    twice that when the cluster has no more CPUs than ``workers`` (Ray started for this job, or a cluster of that
    size), so that the next unit already waits at each worker instead of a round trip to the driver between
    units; else exactly ``workers``, since Ray would run more at once. Without ``workers``: twice the CPUs the
    cluster has now and at least ``MIN_IN_FLIGHT``, re-read as nodes join. The queued surplus is the demand Ray's
    autoscaler acts on: a CPU-0 head with no workers still asks for nodes."""
    cpus = int(ray.cluster_resources().get("CPU", 0))
    if workers:
        return IN_FLIGHT_PER_CPU * workers if cpus <= workers else workers
    return max(MIN_IN_FLIGHT, IN_FLIGHT_PER_CPU * cpus)


def _error_text(exc: BaseException) -> str:
    """The worker's full traceback (Ray's own message shortens it), without terminal colours."""
    text = getattr(exc, "traceback_str", None) or "".join(traceback.format_exception(exc))
    return re.sub(r"\x1b\[[0-9;]*m", "", text).strip()


def _account(outcomes: list[UnitOutcome]) -> dict[str, Any]:
    """inputs = accepted + rejected, per source and per domain, summed over the files of every unit.
    Accepted samples count under their own domain (as the manifest counts them); rejects under the domain
    the file's converter gives (its options may fix one), or the source's declared domain."""
    per_source: dict[str, dict[str, int]] = {}
    per_domain: dict[str, dict[str, int]] = {}
    reasons: dict[str, int] = {}
    examples: dict[str, str] = {}

    def add(table: dict[str, dict[str, int]], name: str, accepted: int, rejected: int) -> None:
        row = table.setdefault(name, {"inputs": 0, "accepted": 0, "rejected": 0})
        row["inputs"] += accepted + rejected
        row["accepted"] += accepted
        row["rejected"] += rejected

    for o in outcomes:
        for f in o.files:
            add(per_source, o.source, f.accepted, f.rejected)
            if f.rejected or not f.inputs:
                add(per_domain, f.domain, 0, f.rejected)
        for domain, n in sorted(o.domains.items()):
            add(per_domain, domain, n, 0)
        for r in o.rejects:
            reason = r.reason.split(":")[0][:80]
            reasons[reason] = reasons.get(reason, 0) + 1
            examples.setdefault(reason, r.reason)
    total = {k: sum(r[k] for r in per_source.values()) for k in ("inputs", "accepted", "rejected")}
    return {"total": total, "sources": per_source, "domains": per_domain,
            "reject_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
            "reject_examples": {k: examples[k] for k in sorted(examples)}}


def _write_reports(target: FolderTarget | BucketTarget, units: list[Unit], outcomes: dict[int, UnitOutcome],
                   result: JobResult) -> None:
    lines = [json.dumps(asdict(r), sort_keys=True)
             for u in units if u.number in outcomes for r in outcomes[u.number].rejects]
    target.put(REJECTS, ("\n".join(lines) + ("\n" if lines else "")).encode())
    summary = {"units": result.units, "failed": result.failed, "accounting": result.accounting}
    target.put(SUMMARY, json.dumps(summary, indent=1, sort_keys=True).encode())


def print_table(result: JobResult) -> None:
    """The final table: per source and domain, inputs = accepted + rejected."""
    acc = result.accounting
    print(f"\n{'':<8}{'name':<20}{'inputs':>10}{'accepted':>10}{'rejected':>10}")
    for kind in ("sources", "domains"):
        for name, row in acc.get(kind, {}).items():
            print(f"{kind[:-1]:<8}{name:<20}{row['inputs']:>10}{row['accepted']:>10}{row['rejected']:>10}")
    t = acc.get("total", {})
    if t:
        print(f"{'total':<28}{t['inputs']:>10}{t['accepted']:>10}{t['rejected']:>10}")
    print(f"{result.units} units ({result.skipped} already done), {result.shards} shards in {result.seconds:.1f}s "
          f"(planning {result.plan_seconds:.1f}s) -> {result.output}")
    reasons = acc.get("reject_reasons", {})
    if reasons:
        examples = acc.get("reject_examples", {})
        print(f"{t.get('rejected', 0)} records rejected; top reasons (one full example each):")
        for reason, n in list(reasons.items())[:5]:
            print(f"  {n:>8}  {examples.get(reason, reason)}")
        print(f"every reject, with its file and record: {join(result.output, REJECTS)}")
    for f in result.failed:
        print(f"FAILED unit {f['unit']} ({f['file']}):\n{f['error']}")


def result_dict(result: JobResult) -> dict[str, Any]:
    return asdict(result)
