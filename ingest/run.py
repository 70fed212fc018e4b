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

from ingest.job import JobConfig, Unit, job_summary_config, plan_units
from ingest.unit import UNITS_DIR, clear_leftovers, completed
from shards.manifest import MANIFEST, finalize_dataset
from shards.writer import write_atomic

REJECTS = "rejects.jsonl"
SUMMARY = "ingest_summary.json"
MIN_IN_FLIGHT = 64
IN_FLIGHT_PER_CPU = 2


@dataclass
class JobResult:
    """What a job did: per-unit outcomes, failures with tracebacks, and the accounting."""

    output: Path
    units: int
    skipped: int
    failed: list[dict[str, Any]] = field(default_factory=list)
    accounting: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed


def _init_ray(workers: int | None) -> Any:
    import ray

    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"logging_level": "WARNING"}
        if not os.environ.get("RAY_ADDRESS"):
            # "local": never attach to a cluster someone else started on this machine with `ray start`
            kwargs.update(address="local", include_dashboard=False)
            if workers:
                kwargs["num_cpus"] = workers
        ray.init(**kwargs)
    return ray


def run_job(cfg: JobConfig, *, workers: int | None = None, progress: bool = True) -> JobResult:
    """Plan, run pending units on Ray with bounded work in flight, then write indices and manifest."""
    t0 = time.perf_counter()
    out = cfg.output_dir()
    out.mkdir(parents=True, exist_ok=True)
    (out / UNITS_DIR).mkdir(exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    units = plan_units(cfg)
    _remove_stale(out, {u.prefix for u in units})
    outcomes: dict[int, dict[str, Any]] = {}
    pending: list[Unit] = []
    for u in units:
        done = completed(out, u)
        if done is not None:
            outcomes[u.number] = done
        else:
            pending.append(u)
    skipped = len(outcomes)
    failed: list[dict[str, Any]] = []
    if pending:
        failed = _execute(pending, cfg, out, outcomes, workers or cfg.workers, progress, skipped, len(units))
    result = JobResult(out, len(units), skipped, failed, seconds=time.perf_counter() - t0)
    result.accounting = _account([outcomes[u.number] for u in units if u.number in outcomes])
    _write_reports(out, units, outcomes, result)
    if result.ok:
        shard_names = [s["name"] for u in units for s in outcomes[u.number]["shards"]]
        finalize_dataset(out, shard_names, writer=cfg.writer,
                         extra={"ingest": job_summary_config(cfg), "accounting": result.accounting,
                                "converters": sorted({f"{o['converter']} ({o['converter_version']})"
                                                      for o in outcomes.values()})})
    return result


def _execute(pending: list[Unit], cfg: JobConfig, out: Path, outcomes: dict[int, dict[str, Any]],
             workers: int | None, progress: bool, skipped: int, total: int) -> list[dict[str, Any]]:
    from tqdm import tqdm

    from ingest.unit import run_unit

    ray = _init_ray(workers)
    task = ray.remote(num_cpus=1, max_retries=cfg.max_retries, retry_exceptions=True)(run_unit)
    in_flight: dict[Any, Unit] = {}
    queue = list(pending)
    failed: list[dict[str, Any]] = []
    records = 0
    bar = tqdm(total=total, initial=skipped, unit="unit", desc="ingest", disable=not progress or None)
    t0 = time.perf_counter()
    while queue or in_flight:
        limit = in_flight_limit(ray, workers)
        while queue and len(in_flight) < limit:
            u = queue.pop(0)
            in_flight[task.remote(u, str(out), cfg.writer)] = u
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        for ref in ready:
            u = in_flight.pop(ref)
            try:
                res = ray.get(ref)
                outcomes[u.number] = res
                records += res["inputs"]
            except Exception as exc:  # noqa: BLE001 - the unit is recorded as failed, others finish
                failed.append({"unit": u.prefix, "file": u.file_id, "start": u.start, "stop": u.stop,
                               "converter": u.converter, "attempts": cfg.max_retries + 1,
                               "error": _error_text(exc)})
            bar.update(1)
            rate = records / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(records=records, rec_s=f"{rate:,.0f}", failed=len(failed))
    bar.close()
    return sorted(failed, key=lambda f: f["unit"])


def in_flight_limit(ray: Any, workers: int | None) -> int:
    """Units kept submitted: the job's ``workers`` when set (a cluster launcher passes the cluster's maximum
    CPUs), else twice the CPUs the cluster has now and at least ``MIN_IN_FLIGHT``, re-read as nodes join. The
    queued surplus is the demand Ray's autoscaler acts on: a CPU-0 head with no workers still asks for nodes."""
    if workers:
        return workers
    return max(MIN_IN_FLIGHT, IN_FLIGHT_PER_CPU * int(ray.cluster_resources().get("CPU", 0)))


def _error_text(exc: BaseException) -> str:
    """The worker's full traceback (Ray's own message shortens it), without terminal colours."""
    text = getattr(exc, "traceback_str", None) or "".join(traceback.format_exception(exc))
    return re.sub(r"\x1b\[[0-9;]*m", "", text).strip()


def _remove_stale(out: Path, prefixes: set[str]) -> None:
    """Drop shards and outcomes of units that are no longer in the plan (the job file changed)."""
    for p in sorted((out / UNITS_DIR).glob("u*.json")):
        if p.stem not in prefixes:
            clear_leftovers(out, p.stem)
    for p in sorted(out.glob("u*-*.tar*")):
        if p.name.split("-")[0] not in prefixes and p.is_file():
            p.unlink()


def _account(outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    """inputs = accepted + rejected, per source and per domain (rejects count under the converter's domain)."""
    from ingest.registry import get_converter

    per_source: dict[str, dict[str, int]] = {}
    per_domain: dict[str, dict[str, int]] = {}
    reasons: dict[str, int] = {}
    for o in outcomes:
        domain = get_converter(o["converter"]).domain
        for table, name in ((per_source, o["source"]), (per_domain, domain)):
            row = table.setdefault(name, {"inputs": 0, "accepted": 0, "rejected": 0})
            for k in row:
                row[k] += o[k]
        for r in o["rejects"]:
            reason = r["reason"].split(":")[0][:80]
            reasons[reason] = reasons.get(reason, 0) + 1
    total = {k: sum(r[k] for r in per_source.values()) for k in ("inputs", "accepted", "rejected")}
    return {"total": total, "sources": per_source, "domains": per_domain,
            "reject_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1]))}


def _write_reports(out: Path, units: list[Unit], outcomes: dict[int, dict[str, Any]], result: JobResult) -> None:
    lines = [json.dumps(r, sort_keys=True) for u in units if u.number in outcomes for r in outcomes[u.number]["rejects"]]
    write_atomic(out / REJECTS, ("\n".join(lines) + ("\n" if lines else "")).encode())
    summary = {"units": result.units, "failed": result.failed, "accounting": result.accounting}
    write_atomic(out / SUMMARY, json.dumps(summary, indent=1, sort_keys=True).encode())


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
    print(f"{result.units} units ({result.skipped} already done) in {result.seconds:.1f}s -> {result.output}")
    for f in result.failed:
        print(f"FAILED unit {f['unit']} ({f['file']} [{f['start']}, {f['stop']})):\n{f['error']}")


def result_dict(result: JobResult) -> dict[str, Any]:
    d = asdict(result)
    d["output"] = str(result.output)
    return d
