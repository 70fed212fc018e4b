"""A newcomer's first hour: `scd shards keys`, defaults in every --help, plain progress lines, Ctrl-C messages."""
from __future__ import annotations

import argparse
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shards.format.manifest import write_dataset
from shards.format.writer import WriterConfig
from shards.progress import Progress
from shards.tools.cli import build_parser, main


@pytest.fixture(scope="module")
def mixed(real_graphs, tmp_path_factory) -> tuple[Path, list]:
    graphs = [g for g in real_graphs if g.domain == "molecule"][:40] + [g for g in real_graphs if g.domain == "crystal"]
    root = tmp_path_factory.mktemp("keys") / "ds"
    write_dataset(graphs, str(root), config=WriterConfig(max_shard_samples=17))
    return root, graphs


def test_shards_keys_lists_every_key_by_domain_and_limit(mixed, capsys) -> None:
    root, graphs = mixed
    assert main(["shards", "keys", str(root)]) == 0
    listed = capsys.readouterr().out.split()
    assert sorted(listed) == sorted(g.key for g in graphs) and len(set(listed)) == len(listed)
    assert main(["shards", "keys", str(root), "--domain", "crystal"]) == 0
    crystals = capsys.readouterr().out.split()
    assert sorted(crystals) == sorted(g.key for g in graphs if g.domain == "crystal") and crystals
    assert main(["shards", "keys", str(root), "--limit", "20"]) == 0
    assert capsys.readouterr().out.split() == listed[:20]  # crosses a shard boundary (17 per shard)
    assert main(["shards", "keys", str(root), "--domain", "protein"]) == 1
    assert "domains present: crystal, molecule" in capsys.readouterr().err
    key = crystals[0]  # what the keys are for: export
    assert main(["shards", "export", str(root), key, "--out", str(root.parent / "x.extxyz")]) == 0
    import ase.io

    atoms = ase.io.read(root.parent / "x.extxyz")
    assert len(atoms) == next(g.n_atoms for g in graphs if g.key == key)


def _parsers(parser: argparse.ArgumentParser, name: str = "scd"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_verify_progress_is_plain_lines_when_not_a_terminal(mixed, capsys, monkeypatch) -> None:
    root, _ = mixed
    monkeypatch.setenv("SCD_PROGRESS_EVERY", "0")
    assert main(["shards", "verify", str(root)]) == 0
    err = capsys.readouterr().err
    n = -(-len(mixed[1]) // 17)
    assert [ln.split(",")[0] for ln in err.splitlines()][:n] == [f"verify: {k}/{n} shard ({k / n:.0%})"
                                                                 for k in range(1, n + 1)]
    assert "\r" not in err and "\x1b" not in err


def test_every_help_states_its_defaults() -> None:
    parsers = dict(_parsers(build_parser()))
    assert {"scd embed", "scd shards keys", "scd shards preview", "scd train", "scd demo"} <= set(parsers)
    checked = 0
    for name, parser in parsers.items():
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if action.default in (None, argparse.SUPPRESS, []) or action.nargs == 0 or action.help == argparse.SUPPRESS:
                continue
            helptext = " ".join((action.help % {**vars(action), "prog": parser.prog}).split())
            assert helptext in text and "default" in helptext, (name, action.dest)  # own words allowed: "by suffix"
            checked += 1
    assert checked > 15
    assert "(default: 4000)" in " ".join(parsers["scd embed"].format_help().split())


def test_progress_plain_lines_when_not_a_terminal(monkeypatch) -> None:
    out = io.StringIO()
    with Progress(5, "train", "step", stream=out, every_s=0) as bar:
        for _ in range(5):
            bar.update()
            bar.set_postfix(loss="0.5")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("train: 1/5 step (20%)") and lines[-1].startswith("train: 5/5 step (100%)")
    assert all("\x1b" not in ln and "\r" not in ln for ln in lines) and "loss=0.5" in lines[-1]
    quiet = io.StringIO()
    with Progress(1000, "x", stream=quiet, every_s=3600) as bar:
        for _ in range(1000):
            bar.update()
    assert len(quiet.getvalue().splitlines()) == 1  # the interval holds; the final line always comes
    monkeypatch.setenv("SCD_PROGRESS_EVERY", "soon")
    with pytest.raises(ValueError, match="SCD_PROGRESS_EVERY"):
        Progress(1, "x", stream=io.StringIO())


def _train_config(tmp: Path, dataset: Path) -> Path:
    import yaml

    cfg = {"run_dir": str(tmp / "run"), "steps": 100000, "seed": 0, "log_every": 1, "checkpoint_every": 2,
           "tensorboard": False, "data": {"datasets": [str(dataset)], "max_atoms": 60, "seed": 0},
           "model": {"kind": "scd", "hidden": 16, "layers": 1, "heads": 2, "num_rbf": 4}}
    path = tmp / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _scd_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "SCD_PROGRESS_EVERY": "0"}


@pytest.mark.slow
def test_train_progress_lines_and_ctrl_c_message(mixed, tmp_path) -> None:
    """Not a terminal: plain progress lines; Ctrl-C: one line naming the checkpoint kept, and resuming works."""
    cfg = _train_config(tmp_path, mixed[0])
    log = tmp_path / "log.txt"
    with log.open("w") as fh:
        # a shell that started the tests in the background (nohup, `&`) ignores SIGINT, and a child inherits
        # that: give the child the default handler, as a terminal's Ctrl-C would find it
        proc = subprocess.Popen([sys.executable, "-m", "shards", "train", str(cfg)], stdout=fh,
                                stderr=subprocess.STDOUT, env=_scd_env(),
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + 300
            while (not sorted((tmp_path / "run").glob("step-*")) and proc.poll() is None
                   and time.monotonic() < deadline):
                time.sleep(0.2)
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text()
    assert rc == 130, text[-3000:]
    kept = sorted((tmp_path / "run").glob("step-*"))[-1]
    lines = text.splitlines()
    assert any(re.fullmatch(r"train: \d+/100000 step \(0%\), .*loss=\d\.\d{4}.*", ln) for ln in lines), text[-3000:]
    assert "\x1b" not in text and "\r" not in text
    assert lines[-1] == f"scd train: interrupted; kept checkpoint {kept} (later steps are lost); " \
                       "run the same command to resume from it"
    step = int(kept.name.split("-")[1])
    again = subprocess.run([sys.executable, "-m", "shards", "train", str(cfg), "--set", f"stop_after={step + 1}"],
                           capture_output=True, text=True, env=_scd_env(), timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(rf"^train: {step + 1}/100000 step", again.stderr, re.M)  # one step after the kept one


def test_demo_interrupt_message_names_what_is_kept(tmp_path) -> None:
    from scd_train.demo import interrupted_message

    assert "kept nothing" in interrupted_message(tmp_path / "nothing-yet")
    (tmp_path / "shards").mkdir()
    assert f"kept the finished ingest units in {tmp_path / 'shards'};" in interrupted_message(tmp_path)
    (tmp_path / "shards" / "manifest.json").write_text("{}")
    (tmp_path / "step-00000050").mkdir()
    (tmp_path / "step-00000050" / "state.json").write_text("{}")  # a checkpoint folder (model files aside)
    msg = interrupted_message(tmp_path)
    assert f"the ingested dataset {tmp_path / 'shards'}, checkpoint {tmp_path / 'step-00000050'};" in msg
    assert "run the same command to continue" in msg


def test_demo_loss_summary_reads_training_rows_among_diagnostics_rows(tmp_path) -> None:
    import json

    from scd_train.demo import loss_summary

    rows = [{"step": s, "loss": 1.0 - s / 100} for s in range(10)]
    rows.insert(3, {"step": 3, "diag_c_spread": 0.5})  # a diagnostics row: no loss
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = loss_summary(tmp_path / "metrics.jsonl")
    assert got["logged_steps"] == 10 and got["first_loss"] == (1.0 + 0.99) / 2
    assert abs(got["last_loss"] - (0.92 + 0.91) / 2) < 1e-12


def test_sections_named_in_help_exist() -> None:
    """A --help that points to a section of README.md or docs/*.md names a heading that exists there."""
    root = Path(__file__).resolve().parents[1]
    refs = []
    for name, parser in _parsers(build_parser()):
        text = " ".join(parser.format_help().split())
        refs += [(name, doc, title) for doc, title in re.findall(r"(README|docs/[\w-]+\.md)\W{1,3}'([^']+)'", text)]
    assert any(name == "scd ingest run" for name, _, _ in refs), refs
    for name, doc, title in refs:
        path = root / ("README.md" if doc == "README" else doc)
        headings = [h.strip() for h in re.findall(r"^#+ (.+)$", path.read_text(), re.M)]
        assert title in headings, f"{name} --help names {doc} section {title!r}; headings: {headings}"


@pytest.mark.slow
def test_demo_prints_progress_lines_when_not_a_terminal(tmp_path) -> None:
    """`scd demo` into a log file: its phase lines, the trainer's progress lines, no colour codes or Ray notices."""
    res = subprocess.run([sys.executable, "-m", "shards", "demo", "--out", str(tmp_path / "d"), "--steps", "3",
                          "--nproc", "1"], capture_output=True, text=True, env=_scd_env(), timeout=1500,
                         stdin=subprocess.DEVNULL)
    text = res.stdout + res.stderr
    assert res.returncode == 0, text[-3000:]
    for phase in ("[1/3] ingest", "[2/3] data report", "[3/3] SCD pretraining"):
        assert phase in res.stdout, res.stdout
    assert re.search(r"^train: 3/3 step \(100%\), .*loss=", text, re.M), text[-3000:]
    assert "\x1b" not in text and "Token authentication" not in text, text[-3000:]
    assert (tmp_path / "d" / "summary.json").is_file()


@pytest.mark.slow
def test_ingest_run_prints_progress_lines_when_not_a_terminal(tmp_path) -> None:
    from scd_train.datakit import package_dir

    cifs = sorted((package_dir("ase") / "test/testdata/minerals").glob("cod_*.cif"))[:3]
    res = subprocess.run([sys.executable, "-m", "shards", "ingest", "run", "--domain", "crystal", "--input",
                          *map(str, cifs), "--out", str(tmp_path / "cod")], capture_output=True, text=True,
                         env=_scd_env(), timeout=600, stdin=subprocess.DEVNULL)
    text = res.stdout + res.stderr
    assert res.returncode == 0, text[-3000:]
    assert re.search(r"^ingest: (\d+)/\1 unit \(100%\)", text, re.M), text[-3000:]
    assert "\x1b" not in text and "Token authentication" not in text, text[-3000:]


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize(("out_tty", "err_tty"), [(False, True), (True, False), (False, False), (True, True)])
def test_ray_worker_lines_carry_no_colour_codes_into_a_file(monkeypatch, out_tty, err_tty) -> None:
    """`scd demo > log` in a terminal: Ray prints a worker's stdout lines to the driver's stdout (the log),
    so they must come without colour codes even though stderr is a terminal; both terminals keep colours."""
    from ray._private.worker import print_worker_logs

    from ingest.rayenv import embedded_ray_env

    monkeypatch.delenv("RAY_COLOR_PREFIX", raising=False)
    monkeypatch.setattr(sys, "stdout", _Stream(out_tty))
    monkeypatch.setattr(sys, "stderr", _Stream(err_tty))
    embedded_ray_env()
    log = io.StringIO()
    print_worker_logs({"pid": 4242, "ip": "10.0.0.1", "localhost": "10.0.0.1", "lines": ["hello"]}, log)
    assert re.sub(r"\x1b\[[0-9;]*m", "", log.getvalue()) == "(pid=4242) hello\n", log.getvalue()
    assert ("\x1b" in log.getvalue()) == (out_tty and err_tty), log.getvalue()
