"""A newcomer's first hour: `scd shards keys`, defaults in every --help, plain progress lines, Ctrl-C messages."""
from __future__ import annotations

import argparse
import io
from pathlib import Path

import pytest

from shards.cli import build_parser, main
from shards.manifest import write_dataset
from shards.progress import Progress
from shards.writer import WriterConfig


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
