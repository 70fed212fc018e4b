"""Run an ingest job on Ray: embedded local Ray by default, a cluster when RAY_ADDRESS is set."""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ingest.job import JobConfig, Mapper, Unit, job_summary_config, plan_units
from ingest.lock import output_lock, remove_temp_files
from ingest.unit import TAILS_DIR, UNITS_DIR, clear_leftovers, completed, shard_intact
from shards.config import ConfigError
from shards.format.manifest import MANIFEST, finalize_dataset
from shards.format.writer import WriterConfig, write_atomic

REJECTS = "rejects.jsonl"
SUMMARY = "ingest_summary.json"
PACK_PREFIX = "pack"
PACK_RECORD = f"{UNITS_DIR}/pack.json"
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
    target-size shards, then write indices and manifest. One job at a time per output folder (a lock);
    temporary files are removed before and after."""
    out = cfg.output_dir()
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    folders = (out, out / UNITS_DIR, out / TAILS_DIR)
    try:
        with output_lock(out):
            remove_temp_files(*folders)
            try:
                return _run_locked(cfg, out, workers, progress)
            except OSError as exc:
                if exc.filename is not None:
                    raise
                raise OSError(exc.errno, f"{exc.strerror or exc} (writing {out})") from exc
            finally:
                remove_temp_files(*folders)
    except ConfigError:
        if created:  # a job that failed its configuration leaves no output folder behind
            shutil.rmtree(out, ignore_errors=True)
        raise


def _run_locked(cfg: JobConfig, out: Path, workers: int | None, progress: bool) -> JobResult:
    t0 = time.perf_counter()
    (out / TAILS_DIR).mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    units = plan_units(cfg, ray_mapper(workers or cfg.workers))
    plan_seconds = time.perf_counter() - t0
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
    result = JobResult(out, len(units), skipped, failed, plan_seconds=plan_seconds)
    result.accounting = _account([outcomes[u.number] for u in units if u.number in outcomes])
    _write_reports(out, units, outcomes, result)
    if result.ok:
        packed = _pack_tails(out, [outcomes[u.number] for u in units], cfg.writer)
        shard_names = [s["name"] for u in units for s in outcomes[u.number]["shards"]] + packed
        result.shards = len(shard_names)
        converters = {f"{name} ({version})" for o in outcomes.values() for name, version in o["converters"].items()}
        finalize_dataset(out, shard_names, writer=cfg.writer,
                         extra={"ingest": job_summary_config(cfg), "accounting": result.accounting,
                                "converters": sorted(converters)})
    result.seconds = time.perf_counter() - t0
    return result


def _pack_tails(out: Path, outcomes: list[dict[str, Any]], writer: WriterConfig) -> list[str]:
    """Copy the units' tail shards, in unit order, into target-size ``pack-NNNNNN.tar`` shards; reuse an
    intact earlier packing of the very same tails (its record is written after the shards)."""
    from shards.tools.compact import pack_local

    tails = [o["tail"] for o in outcomes if o.get("tail")]
    inputs = [[t["name"], t["sha256"]] for t in tails]
    record_path = out / PACK_RECORD
    try:
        record = json.loads(record_path.read_bytes()) if record_path.is_file() else None
    except ValueError:
        record = None
    if (isinstance(record, dict) and record.get("inputs") == inputs
            and all(shard_intact(out, s) for s in record.get("shards", []))):
        return [s["name"] for s in record["shards"]]
    record_path.unlink(missing_ok=True)
    for p in out.glob(f"{PACK_PREFIX}-*"):
        p.unlink()
    shards = pack_local(((out / TAILS_DIR / t["name"], t["sha256"]) for t in tails), out, PACK_PREFIX, writer)
    record = {"inputs": inputs, "shards": [asdict(s) for s in shards]}
    write_atomic(record_path, json.dumps(record, sort_keys=True).encode())
    return [s.name for s in shards]


def _execute(pending: list[Unit], cfg: JobConfig, out: Path, outcomes: dict[int, dict[str, Any]],
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
            in_flight[task.remote(u, str(out), cfg.writer)] = u
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        for ref in ready:
            u = in_flight.pop(ref)
            try:
                res = ray.get(ref)
                outcomes[u.number] = res
                records += res["inputs"]
            except Exception as exc:  # noqa: BLE001 - the unit is recorded as failed, others finish
                failed.append({"unit": u.prefix, "file": u.describe(), "files": len(u.items),
                               "attempts": cfg.max_retries + 1, "error": _error_text(exc)})
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
    for folder in (out, out / TAILS_DIR):
        for p in sorted(folder.glob("u*-*.tar*")):
            if p.name.split("-")[0] not in prefixes and p.is_file():
                p.unlink()


def _account(outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    """inputs = accepted + rejected, per source and per domain, summed over the files of every unit
    (rejects count under the domain of the file's converter, or the source's declared domain)."""
    per_source: dict[str, dict[str, int]] = {}
    per_domain: dict[str, dict[str, int]] = {}
    reasons: dict[str, int] = {}
    examples: dict[str, str] = {}
    for o in outcomes:
        for f in o["files"]:
            for table, name in ((per_source, o["source"]), (per_domain, f["domain"])):
                row = table.setdefault(name, {"inputs": 0, "accepted": 0, "rejected": 0})
                for k in row:
                    row[k] += f[k]
        for r in o["rejects"]:
            reason = r["reason"].split(":")[0][:80]
            reasons[reason] = reasons.get(reason, 0) + 1
            examples.setdefault(reason, r["reason"])
    total = {k: sum(r[k] for r in per_source.values()) for k in ("inputs", "accepted", "rejected")}
    return {"total": total, "sources": per_source, "domains": per_domain,
            "reject_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
            "reject_examples": {k: examples[k] for k in sorted(examples)}}


def _write_reports(out: Path, units: list[Unit], outcomes: dict[int, dict[str, Any]], result: JobResult) -> None:
    lines = [json.dumps(r, sort_keys=True)
             for u in units if u.number in outcomes for r in outcomes[u.number]["rejects"]]
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
    print(f"{result.units} units ({result.skipped} already done), {result.shards} shards in {result.seconds:.1f}s "
          f"(planning {result.plan_seconds:.1f}s) -> {result.output}")
    reasons = acc.get("reject_reasons", {})
    if reasons:
        examples = acc.get("reject_examples", {})
        print(f"{t.get('rejected', 0)} records rejected; top reasons (one full example each):")
        for reason, n in list(reasons.items())[:5]:
            print(f"  {n:>8}  {examples.get(reason, reason)}")
        print(f"every reject, with its file and record: {result.output / REJECTS}")
    for f in result.failed:
        print(f"FAILED unit {f['unit']} ({f['file']}):\n{f['error']}")


def result_dict(result: JobResult) -> dict[str, Any]:
    d = asdict(result)
    d["output"] = str(result.output)
    return d
