"""Mutation testing of the core modules with mutmut, one module at a time, each against its fast tests.

    python tools/mutation.py                      # every module in MODULES
    python tools/mutation.py planner mixture      # some of them
    python tools/mutation.py codec --children 2 --keep /tmp/mut
    python tools/mutation.py planner --sample 80 --seed 1   # a seeded random sample of the mutants
    python tools/mutation.py objective --rev HEAD           # a commit's files, not the working tree

For each module the script copies the working tree (tracked and untracked, not ignored files), or with
``--rev`` the files of that commit (``git archive``: a shared tree's uncommitted edits stay out), into a
temporary folder, so the real tree is never mutated, writes a ``[tool.mutmut]`` section that mutates only
that module and selects only its fast tests, runs ``mutmut run`` there (``nice -n 10``) and reads the
result of every mutant. It prints one line per module: killed (timeouts included), survived, no tests
(no selected test runs the mutated function), suspicious, and the score = killed / mutants checked
(no-tests mutants count as not killed); then the names of the mutants not killed. It writes
``mutation.json`` (per module: counts and survivor names) into the working directory or ``--out``.
``mutmut show NAME`` inside the kept copy (``--keep DIR``) prints a survivor's diff.
Needs mutmut 3.8.1 (in the ``dev`` extra).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# module name -> (file to mutate, fast tests that exercise it)
MODULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "planner": ("shards/stream/plan.py", (
        "tests/test_mixture_oracle.py::test_emitted_domains_match_hand_written_shares",
        "tests/test_mixture_oracle.py::test_mix_holds_on_every_rank",
        "tests/test_mixture_oracle.py::test_domain_draws_depend_on_the_seed_and_only_on_it",
        "tests/test_mixture_oracle.py::test_nothing_fits_is_an_error_and_one_sample_is_a_whole_mix",
        "tests/test_mixture_oracle.py::test_cell_repeats_per_axis_within_the_budget",
        "tests/test_planner.py::test_every_sample_once_per_pass_across_ranks",
        "tests/test_planner.py::test_same_seed_same_batches_other_seed_differs",
        "tests/test_planner.py::test_resume_equals_uninterrupted",
        "tests/test_planner.py::test_resume_with_other_world_size_is_refused",
        "tests/test_planner.py::test_budget_never_exceeded_and_oversize_reported",
        "tests/test_planner.py::test_oversize_count_equals_the_big_samples_of_a_pass",
        "tests/test_planner.py::test_trajectory_cap_per_pass",
        "tests/test_planner.py::test_equal_steps_per_rank_with_unequal_data",
        "tests/test_planner.py::test_logged_mix_is_the_mix_of_emitted_rows",
        "tests/test_properties.py::test_planner_passes_budget_and_equal_steps",
        "tests/test_planner_mutants.py",
    )),
    "mixture": ("shards/stream/mixture.py", (
        "tests/test_mixture_oracle.py",
        "tests/test_planner.py::test_group_probabilities",
    )),
    "codec": ("shards/format/codec.py", (
        "tests/test_shards.py::test_codec_round_trip_bit_exact",
        "tests/test_shards.py::test_codec_rejects_garbage_and_truncation",
        "tests/test_properties.py::test_codec_round_trip_of_random_valid_graphs",
        "tests/test_schema.py::test_unknown_major_version_refused",
        "tests/test_codec_mutants.py",
    )),
    "validation": ("shards/format/validate.py", (
        "tests/test_schema.py",
        "tests/test_properties.py::test_validation_rejects_random_invalid_graphs",
        "tests/test_properties.py::test_codec_round_trip_of_random_valid_graphs",
    )),
    "accounting": ("ingest/unit.py", (
        "tests/test_accounting_oracle.py::test_units_account_for_every_record_against_the_oracle",
        "tests/test_accounting_oracle.py::test_a_finished_unit_is_recognised_until_anything_changes",
        "tests/test_accounting_oracle.py::test_missing_input_fingerprint_and_leftovers_cleared",
        "tests/test_accounting_oracle.py::test_tail_is_under_half_the_target_in_bytes_and_samples",
        "tests/test_accounting_oracle.py::test_per_file_rows_sniff_failures_and_domain_hints",
        "tests/test_accounting_mutants.py",
    )),
    "objective": ("scd_train/objectives.py", (
        "tests/test_objectives.py::test_loss_finite_and_decreasing",
        "tests/test_objectives.py::test_gradients_reach_pass_one_through_c",
        "tests/test_objectives.py::test_drop_cond_one_ignores_clean_view",
        "tests/test_objectives.py::test_training_without_generator_raises",
        "tests/test_objectives.py::test_noise_stats_update_save_restore",
        "tests/test_objectives.py::test_loss_sum_is_additive_over_graphs",
        "tests/test_objectives.py::test_build_objective_rejects_unknown",
        "tests/test_objectives.py::test_unfrozen_embeddings_train",
        "tests/test_objectives.py::test_embed_single_view",
        "tests/test_equivariance.py::test_noise_centring_removes_the_unlearnable_translation",
        "tests/test_equivariance.py::test_noise_centring_loss_is_invariant",
        "tests/test_objective_mutants.py",
    )),
}
STATUSES = ("killed", "survived", "no tests", "timeout", "suspicious", "skipped", "not checked", "segfault")


def copy_tree(dest: Path, rev: str | None = None) -> None:
    """Tracked and untracked (not ignored) files of the working tree, as they are now; or commit ``rev``'s."""
    if rev is not None:
        archive = subprocess.run(["git", "archive", "--format=tar", rev], cwd=REPO, check=True,
                                 capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(dest, filter="data")
        return
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def configure(root: Path, target: str, tests: tuple[str, ...]) -> None:
    """Append the mutmut section: mutate ``target`` only, run only ``tests``."""
    lines = ["", "[tool.mutmut]", 'source_paths = ["shards", "ingest", "scd_train"]',
             f"only_mutate = [{json.dumps(target)}]",
             'also_copy = ["README.md"]',  # tests/test_schema.py checks the README's field table
             f"pytest_add_cli_args_test_selection = {json.dumps(list(tests))}",
             'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "-x", "-o", "addopts="]', ""]
    with open(root / "pyproject.toml", "a") as fh:
        fh.write("\n".join(lines))


def results(root: Path, mutmut: str) -> dict[str, str]:
    """Mutant name -> status, from ``mutmut results --all true``."""
    out = subprocess.run([mutmut, "results", "--all", "true"], cwd=root, capture_output=True, text=True,
                         check=True).stdout
    found = {}
    for line in out.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and status in STATUSES:
            found[name] = status
    return found


# mutmut runs the tests once in its own process, then forks a child per mutant: a torch thread pool started in
# the parent deadlocks the forked children (they wait forever on a futex), so torch runs on one thread
SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def _run_mutmut(root: Path, mutmut: str, children: int, names: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["nice", "-n", "10", mutmut, "run", "--max-children", str(children), *names], cwd=root,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, **SINGLE_THREAD})


def run_module(name: str, children: int, keep: Path | None, mutmut: str, sample: int = 0, seed: int = 0,
               rev: str | None = None) -> dict:
    target, tests = MODULES[name]
    root = (keep / name) if keep else Path(tempfile.mkdtemp(prefix=f"mutation-{name}-"))
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    try:
        copy_tree(root, rev)
        configure(root, target, tests)
        t0 = time.perf_counter()
        names: list[str] = []
        if sample:
            _run_mutmut(root, mutmut, children, ["__no_such_mutant__"])  # generates the mutants and stats only
            everything = sorted(results(root, mutmut))
            if len(everything) > sample:
                names = sorted(random.Random(seed).sample(everything, sample))
        proc = _run_mutmut(root, mutmut, children, names)
        seconds = time.perf_counter() - t0
        status = results(root, mutmut)
        if names:
            status = {n: status[n] for n in names}
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
    counts = Counter(status.values())
    checked = sum(counts.values()) - counts["not checked"] - counts["skipped"]
    killed = counts["killed"] + counts["timeout"]
    return {"module": name, "file": target, "rev": rev, "tests": list(tests), "seconds": round(seconds, 1),
            "sampled": len(names),
            "exit_code": proc.returncode, "stderr_tail": proc.stderr[-2000:] if proc.returncode else "",
            "counts": dict(counts), "score": round(killed / checked, 3) if checked else None,
            "survivors": sorted(n for n, s in status.items() if s in ("survived", "no tests", "suspicious"))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("modules", nargs="*", help=f"some of {', '.join(MODULES)} (default: all)")
    ap.add_argument("--children", type=int, default=2, help="mutants tested in parallel (default 2)")
    ap.add_argument("--keep", type=Path, help="keep each module's mutated copy under this folder")
    ap.add_argument("--out", type=Path, default=Path("mutation.json"))
    ap.add_argument("--sample", type=int, default=0, help="test only this many mutants per module, drawn with --seed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rev", help="mutate the files of this commit (git archive) instead of the working tree")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.modules) - set(MODULES))
    if unknown:
        ap.error(f"unknown modules {unknown}; known: {', '.join(MODULES)}")
    mutmut = shutil.which("mutmut", path=str(Path(sys.executable).parent)) or shutil.which("mutmut")
    if mutmut is None:
        print("mutmut is not installed: pip install mutmut==3.8.1 (or the dev extra)", file=sys.stderr)
        return 2
    rev = None
    if args.rev:
        found = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{args.rev}^{{commit}}"], cwd=REPO,
                               capture_output=True, text=True)
        if found.returncode:
            ap.error(f"--rev {args.rev!r} is not a commit of {REPO}")
        rev = found.stdout.strip()
    report = {}
    for name in args.modules or list(MODULES):
        r = run_module(name, args.children, args.keep, mutmut, args.sample, args.seed, rev)
        report[name] = r
        c = r["counts"]
        sampled = f", a random sample of {r['sampled']} mutants" if r["sampled"] else ""
        print(f"{name:<11} {r['file']:<26} killed {c.get('killed', 0) + c.get('timeout', 0):>4}  "
              f"survived {c.get('survived', 0):>4}  no tests {c.get('no tests', 0):>4}  "
              f"suspicious {c.get('suspicious', 0):>3}  score {r['score']}  ({r['seconds']:.0f} s{sampled})",
              flush=True)
        for s in r["survivors"]:
            print(f"    {s}", flush=True)
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
