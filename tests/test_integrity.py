"""Hostile inputs on the read side: every edit of an index, a shard, a manifest, a checkpoint or a config
is caught, reported in one line that names the file, and nothing wrong reaches a batch.

The hostile data is made here from small real datasets (ASE g2 molecules, pymatgen crystals, the adk
protein); every expectation is computed independently of the code under test (zarr, json, hashlib,
struct, ase.neighborlist).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from scd_train.config import DataConfig
from scd_train.data import make_stream
from scd_train.views import ViewConfig
from shards.config import ConfigError, load_yaml
from shards.format.audit import inspect_dataset, verify_dataset
from shards.format.codec import decode
from shards.format.manifest import write_dataset
from shards.format.reader import ShardDataset, ShardError
from shards.format.writer import ShardWriter, WriterConfig
from shards.stream.graph import EdgeBudgetError, radius_graph
from shards.stream.mixture import MixtureConfig
from shards.tools.cli import main as scd_main


# ----------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def mixed(real_graphs, tmp_path_factory) -> Path:
    """20 molecules, 3 crystals and the 3,341-atom adk protein in shards of 8."""
    crystals = [g for g in real_graphs if g.domain == "crystal"][:3]
    graphs = [*real_graphs[:20], *crystals, real_graphs[-1]]
    assert real_graphs[-1].n_atoms > 1000
    root = tmp_path_factory.mktemp("integrity") / "mixed"
    write_dataset(graphs, root, config=WriterConfig(max_shard_samples=8))
    return root


@pytest.fixture(scope="module")
def molecules(real_graphs, tmp_path_factory) -> Path:
    """20 g2 molecules in two shards (one mixture group, so one batch can hold exactly one pass)."""
    root = tmp_path_factory.mktemp("integrity") / "molecules"
    write_dataset(real_graphs[:20], root, config=WriterConfig(max_shard_samples=10))
    return root


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _json(path: Path) -> object:
    return json.loads(path.read_text())


def _one_line(msg: str, *names: str) -> str:
    assert "\n" not in msg.strip() and "Traceback" not in msg, msg
    for n in names:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


def _pass_cfg(root: str, **kw) -> DataConfig:
    """A loader whose first batch is exactly one pass over a one-group dataset."""
    total = sum(s["n_atoms"] for s in _json(Path(root) / "manifest.json")["shards"]) if "://" not in root \
        else kw.pop("total")
    return DataConfig(datasets=(root,), seed=1, max_atoms=total, views=ViewConfig(noise=False), **kw)


def _member(root: Path, row: int) -> tuple[str, int, int, str]:
    """(shard name, data offset, size, key) of sample ``row`` of the first shard, from the json index."""
    name = sorted(p.name for p in root.glob("*.tar"))[0]
    idx = _json(root / f"{name}.idx.json")
    return name, idx["offset"][row], idx["size"][row], idx["key"][row]


def _positions_at(blob: bytes, off: int, size: int) -> tuple[int, np.ndarray]:
    """Byte position of the float32 positions array inside a sample, and the array."""
    g = decode(blob[off:off + size])
    raw = np.ascontiguousarray(g.positions, dtype="<f4").tobytes()
    at = blob.find(raw, off, off + size)
    assert at >= 0
    return at, np.asarray(g.positions, dtype="<f4")


# ----------------------------------------------------------------------- 1. the zarr index is verified
def _zarr_rows(root: Path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(root / "index.zarr"), mode="r")
    return {c: g[c][:] for c in ("n_atoms", "domain", "shard", "offset")}


def _edit_cases(root: Path) -> dict[str, tuple[int, int]]:
    rows = _zarr_rows(root)
    big = int(np.argmax(rows["n_atoms"]))
    domains = list(zarr.open_group(str(root / "index.zarr"), mode="r").attrs["domains"])
    return {"n_atoms": (big, 10),  # the 3,341-atom protein claims 10 atoms
            "offset": (1, int(rows["offset"][2])),  # row 1 points at the bytes of row 2
            "domain": (0, domains.index("crystal")),  # a molecule relabelled as a crystal
            "shard": (3, 99)}  # a shard that does not exist


@pytest.mark.parametrize("column", ["n_atoms", "offset", "domain", "shard"])
def test_edited_zarr_column_is_caught_by_verify_loader_and_inspect(mixed, tmp_path, column):
    root = _copy(mixed, tmp_path / "ds")
    row, value = _edit_cases(root)[column]
    zarr.open_group(str(root / "index.zarr"), mode="r+")[column][row] = value

    rep = verify_dataset(str(root))
    assert len(rep.errors) == 1
    _one_line(rep.errors[0], "index.zarr", f"column {column!r} row {row}", str(value))

    with pytest.raises(ShardError) as err:
        make_stream(DataConfig(datasets=(str(root),), max_atoms=192))
    _one_line(str(err.value), "index.zarr", f"column {column!r}", "manifest")
    if column in ("n_atoms", "domain"):  # inspect reads (and checks) only the columns it summarises
        with pytest.raises(ShardError, match=rf"column {column!r}"):
            inspect_dataset(str(root))


def test_edit_that_also_rewrites_the_manifest_digest_is_still_caught_by_verify(mixed, tmp_path):
    root = _copy(mixed, tmp_path / "ds")
    row, value = _edit_cases(root)["n_atoms"]
    col = zarr.open_group(str(root / "index.zarr"), mode="r+")["n_atoms"]
    col[row] = value
    manifest = _json(root / "manifest.json")
    manifest["index"]["sha256"]["n_atoms"] = hashlib.sha256(col[:].astype("<i4").tobytes()).hexdigest()
    (root / "manifest.json").write_text(json.dumps(manifest))

    rep = verify_dataset(str(root))
    assert len(rep.errors) == 1
    _one_line(rep.errors[0], "index.zarr", f"column 'n_atoms' row {row}", "holds 10", "3341")


def test_out_of_range_shard_number_in_get_is_one_line(mixed, tmp_path):
    root = _copy(mixed, tmp_path / "ds")
    ds = ShardDataset(str(root))
    key = ds.shard_index(ds.shard_names[0])["key"][3]
    zarr.open_group(str(root / "index.zarr"), mode="r+")["shard"][3] = 99
    with pytest.raises(ShardError) as err:
        ShardDataset(str(root)).get(key)
    _one_line(str(err.value), "index.zarr", "names shard 99")


def test_sound_dataset_plans_every_row_it_was_written_with(mixed):
    ds = ShardDataset(str(mixed))
    cols = ds.columns()
    rows = _zarr_rows(mixed)
    assert all(np.array_equal(cols[c], rows[c]) for c in rows)
    assert verify_dataset(str(mixed)).ok


# ------------------------------------------------------------------ 2. checked bytes on the hot path
def test_flipped_coordinate_in_local_shard_never_reaches_a_batch(molecules, tmp_path):
    root = _copy(molecules, tmp_path / "ds")
    name, off, size, key = _member(root, 4)
    blob = bytearray((root / name).read_bytes())
    at, _ = _positions_at(bytes(blob), off, size)
    blob[at] ^= 0x01  # lowest mantissa bit of x of atom 0: still a valid structure
    (root / name).write_bytes(bytes(blob))
    assert decode(bytes(blob[off:off + size])).key == key  # the sample alone would decode fine

    with pytest.raises(ShardError) as err:
        next(iter(make_stream(_pass_cfg(str(root)))))
    _one_line(str(err.value), name, "checksum")

    batch = next(iter(make_stream(_pass_cfg(str(root), on_corrupt="skip"))))
    n = _json(root / "manifest.json")["n_samples"]
    assert key not in batch["keys"] and len(batch["keys"]) == n - 1 == len(set(batch["keys"]))
    assert batch["corrupt_skipped"] == 1

    rep = verify_dataset(str(root))
    assert len(rep.errors) == 1
    _one_line(rep.errors[0], name, "sha256")


def test_remote_shard_edited_by_100_angstrom_without_cache_is_caught(molecules, http_root):
    base, folder = http_root
    root = _copy(molecules, folder / "ds")
    total = sum(s["n_atoms"] for s in _json(root / "manifest.json")["shards"])
    name, off, size, key = _member(root, 2)
    blob = bytearray((root / name).read_bytes())
    at, pos = _positions_at(bytes(blob), off, size)
    moved = pos.copy()
    moved[:, 0] += 100.0
    blob[at:at + moved.nbytes] = moved.tobytes()
    (root / name).write_bytes(bytes(blob))
    edited = decode(bytes(blob[off:off + size]))
    assert np.allclose(edited.positions[:, 0] - pos[:, 0], 100.0)  # valid data, silently wrong without a check

    url = f"{base}/ds"
    with pytest.raises(ShardError) as err:
        next(iter(make_stream(_pass_cfg(url, total=total, cache_dir=None))))
    _one_line(str(err.value), f"{url}/{name}", "checksum")
    batch = next(iter(make_stream(_pass_cfg(url, total=total, cache_dir=None, on_corrupt="skip"))))
    assert key not in batch["keys"] and batch["corrupt_skipped"] == 1 and len(batch["keys"]) == 19
    assert np.abs(batch["pos"]).max() < 50.0


def test_edited_file_in_the_remote_shard_cache_is_caught(molecules, http_root, tmp_path):
    base, folder = http_root
    root = _copy(molecules, folder / "ds")
    total = sum(s["n_atoms"] for s in _json(root / "manifest.json")["shards"])
    cache = tmp_path / "cache"
    url = f"{base}/ds"
    first = next(iter(make_stream(_pass_cfg(url, total=total, cache_dir=str(cache)))))
    name, off, size, key = _member(root, 5)
    cached = next(p for p in cache.iterdir() if p.name.endswith(name))
    blob = bytearray(cached.read_bytes())
    at, _ = _positions_at(bytes(blob), off, size)
    blob[at + 1] ^= 0x10
    cached.write_bytes(bytes(blob))  # same size: the cache would reuse it unchecked
    batch = next(iter(make_stream(_pass_cfg(url, total=total, cache_dir=str(cache), on_corrupt="skip"))))
    assert key in first["keys"] and key not in batch["keys"] and batch["corrupt_skipped"] == 1
    assert sorted(batch["keys"]) == sorted(k for k in first["keys"] if k != key)


# ------------------------------------------------------------- 3. names from a dataset; remote verify
@pytest.mark.parametrize("bad", ["..%2f..%2fsecret%2fu000000-000000.tar", "../u000000-000000.tar",
                                 ".hidden.tar", "a b.tar", "a\\b.tar"])
def test_unsafe_shard_names_in_a_manifest_are_refused(molecules, tmp_path, bad):
    root = _copy(molecules, tmp_path / "ds")
    manifest = _json(root / "manifest.json")
    manifest["shards"][0]["name"] = bad
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError) as err:
        ShardDataset(str(root))
    _one_line(str(err.value), "manifest.json", "shards[0]", "plain file name")


def test_writer_refuses_a_prefix_outside_the_safe_set(tmp_path):
    with pytest.raises(ValueError, match="plain file name"):
        ShardWriter(tmp_path, prefix="a%2fb")


def test_verify_and_inspect_work_over_http(mixed, http_root):
    base, folder = http_root
    _copy(mixed, folder / "ds")
    rep = verify_dataset(f"{base}/ds")
    assert rep.ok and rep.n_samples == _json(mixed / "manifest.json")["n_samples"]
    remote, local = inspect_dataset(f"{base}/ds"), inspect_dataset(str(mixed))
    remote.pop("root"), local.pop("root")
    assert remote == local


# ------------------------------------------------------------------------ 8. structure of JSON files
def _deep(n: int) -> str:
    return "[" * n + "]" * n


MANIFEST_EDITS = {
    "a list": (lambda m: [m], "must be a JSON object, got list"),
    "no shards": (lambda m: {k: v for k, v in m.items() if k != "shards"}, "lacks key(s) ['shards']"),
    "string n_bytes": (lambda m: {**m, "shards": [{**m["shards"][0], "n_bytes": "1"}, *m["shards"][1:]]},
                       "'n_bytes' must be a non-negative integer, got str"),
    "float n_samples": (lambda m: {**m, "n_samples": float(m["n_samples"])}, "'n_samples' must be a non-negative"),
    "no digests": (lambda m: {k: v for k, v in m.items() if k != "index"}, "lacks key(s) ['index']"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_EDITS))
def test_malformed_manifest_is_one_line_naming_it(molecules, tmp_path, capsys, case):
    root = _copy(molecules, tmp_path / "ds")
    edit, expect = MANIFEST_EDITS[case]
    (root / "manifest.json").write_text(json.dumps(edit(_json(root / "manifest.json"))))
    with pytest.raises(ShardError) as err:
        ShardDataset(str(root))
    _one_line(str(err.value), str(root / "manifest.json"), expect)
    assert scd_main(["shards", "verify", str(root)]) == 1
    _one_line(capsys.readouterr().err, "manifest.json", expect)


@pytest.mark.parametrize("depth", [100, 200_000])
def test_deeply_nested_manifest_is_one_line(molecules, tmp_path, depth):
    root = _copy(molecules, tmp_path / "ds")
    text = (root / "manifest.json").read_text()
    (root / "manifest.json").write_text(text.replace('"writer":', f'"extra_nest": {_deep(depth)}, "writer":', 1))
    with pytest.raises(ShardError) as err:
        ShardDataset(str(root))
    _one_line(str(err.value), "manifest.json", "nested")


INDEX_EDITS = {
    "float offsets": (lambda d: {**d, "offset": [float(x) for x in d["offset"]]},
                      "'offset' must be a list of non-negative integers (item 0 is float"),
    "string offsets": (lambda d: {**d, "offset": [str(x) for x in d["offset"]]},
                       "'offset' must be a list of non-negative integers (item 0 is str"),
    "a list": (lambda d: list(d), "must be a JSON object, got list"),
    "no checksum": (lambda d: {k: v for k, v in d.items() if k != "checksum"}, "lacks key(s) ['checksum']"),
    "short column": (lambda d: {**d, "size": d["size"][:-1]}, "'size' has 9 rows, expected 10"),
    "deep": (lambda d: {**d, "nest": json.loads(_deep(100))}, "nested"),
}


@pytest.mark.parametrize("case", sorted(INDEX_EDITS))
def test_malformed_shard_index_is_one_line_naming_it(molecules, tmp_path, case):
    root = _copy(molecules, tmp_path / "ds")
    name = _json(root / "manifest.json")["shards"][0]["name"]
    ipath = root / f"{name}.idx.json"
    edit, expect = INDEX_EDITS[case]
    ipath.write_text(json.dumps(edit(_json(ipath))))
    with pytest.raises(ShardError) as err:  # the manifest's sha256 of the index catches it first
        ShardDataset(str(root)).shard_index(name)
    _one_line(str(err.value), str(ipath), "does not match the manifest")

    manifest = _json(root / "manifest.json")  # a manifest that agrees: now the structure check answers
    manifest["shards"][0]["index_sha256"] = hashlib.sha256(ipath.read_bytes()).hexdigest()
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError) as err:
        ShardDataset(str(root)).shard_index(name)
    _one_line(str(err.value), str(ipath), expect)
    rep = verify_dataset(str(root))
    assert len(rep.errors) == 1 and expect in rep.errors[0] and str(ipath) in rep.errors[0]


# ---------------------------------------------------------------------------------- 9. checkpoints
def _train_state(seed: int):
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return model, opt, sched


def _checkpointer(run: Path, model, opt, sched):
    from scd_train.checkpoint import Checkpointer

    return Checkpointer(run, {"model": model, "optimizer": opt, "scheduler": sched})


def _two_checkpoints(run: Path) -> dict[int, dict]:
    weights = {}
    for step in (1, 2):
        model, opt, sched = _train_state(step)
        _checkpointer(run, model, opt, sched).save(step, {"step": step})
        weights[step] = {k: v.clone() for k, v in model.state_dict().items()}
    return weights


@pytest.mark.parametrize("damage", ["model.safetensors", "optim.safetensors", "state.json", "state-structure"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, damage):
    from scd_train.checkpoint import CheckpointError

    run = tmp_path / "run"
    weights = _two_checkpoints(run)
    newest = run / "step-00000002"
    if damage == "state-structure":
        state = _json(newest / "state.json")
        state["optimizer"] = ["not", "a", "mapping"]
        (newest / "state.json").write_text(json.dumps(state))
        bad = newest / "state.json"
    else:
        bad = newest / damage
        data = bad.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    model, opt, sched = _train_state(7)
    with pytest.raises(CheckpointError) as err:
        _checkpointer(run, model, opt, sched).load(newest)
    _one_line(str(err.value), str(bad))

    with caplog.at_level(logging.WARNING, logger="scd_train.checkpoint"):
        path, state = _checkpointer(run, model, opt, sched).load_latest()
    assert path == run / "step-00000001" and state is not None and state["step"] == 1
    assert all(np.array_equal(model.state_dict()[k].numpy(), v.numpy()) for k, v in weights[1].items())
    warned = [r.getMessage() for r in caplog.records if r.name == "scd_train.checkpoint"]
    assert len(warned) == 1
    _one_line(warned[0], "step-00000002", str(bad))


@pytest.mark.parametrize("text,expect", [('{"config": []}', "'config' must be an object, got list"),
                                         ('{"config": {"model": 3}}', "'model' must be an object, got int"),
                                         ("{\"step\": 1", "not valid JSON"),
                                         (_deep(100), "nested")])
def test_finetune_and_embed_read_checkpoint_state_structurally(tmp_path, text, expect):
    from scd_train.checkpoint import CheckpointError
    from scd_train.embed import load_objective
    from scd_train.finetune import model_config_from_checkpoint

    ckpt = tmp_path / "step-00000001"
    ckpt.mkdir()
    (ckpt / "state.json").write_text(text)
    (ckpt / "model.safetensors").write_bytes(b"")
    for read in (model_config_from_checkpoint, load_objective):
        with pytest.raises(CheckpointError) as err:
            read(ckpt)
        _one_line(str(err.value), str(ckpt / "state.json"), expect)


def test_orphan_temp_folders_are_removed_at_start(tmp_path):
    from scd_train.checkpoint import list_checkpoints, remove_stale_temp

    run = tmp_path / "run"
    _two_checkpoints(run)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    orphan = run / f".tmp-step-00000003-{int(dead.stdout)}"
    (orphan / "sub").mkdir(parents=True)
    (orphan / "model.safetensors").write_bytes(b"half")
    live = run / f".tmp-step-00000003-{1}"  # pid 1 is alive: a save in flight is left alone
    live.mkdir()
    assert remove_stale_temp(run) == [orphan]
    assert not orphan.exists() and live.exists()
    assert [p.name for p in list_checkpoints(run)] == ["step-00000001", "step-00000002"]


@pytest.mark.slow
def test_training_resumes_from_the_newest_valid_checkpoint(molecules, tmp_path, caplog):
    import yaml

    from scd_train.config import load_train_config
    from scd_train.trainer import Trainer

    def config(name: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "run_dir": str(tmp_path / name), "steps": 6, "seed": 3, "log_every": 1, "checkpoint_every": 2,
            "tensorboard": False, "progress": False, "keep_checkpoints": 5,
            "data": {"datasets": [str(molecules)], "max_atoms": 60, "seed": 3},
            "model": {"kind": "scd", "backbone": "et", "preset": "small", "hidden": 16, "layers": 1, "heads": 2,
                      "num_rbf": 8}}))
        return path

    def losses(run: Path) -> list[tuple[int, float]]:
        return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]

    Trainer(load_train_config(config("full"))).fit()
    part = config("part")
    Trainer(load_train_config(part, ["stop_after=4"])).fit()
    run = tmp_path / "part"
    damaged = run / "step-00000004" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])
    orphan = run / ".tmp-step-00000006-999999999"
    orphan.mkdir()
    with caplog.at_level(logging.WARNING, logger="scd_train.checkpoint"):
        trainer = Trainer(load_train_config(part))
    assert trainer.step == 2 and not orphan.exists()
    warned = [r.getMessage() for r in caplog.records if r.name == "scd_train.checkpoint"]
    assert len(warned) == 1
    _one_line(warned[0], str(damaged))
    trainer.fit()
    assert losses(run) == losses(tmp_path / "full") and len(losses(run)) == 6


# ---------------------------------------------------------------------------------------- 12. config
def _train_yaml(tmp_path: Path, dataset: Path, extra: str = "") -> Path:
    path = tmp_path / "train.yaml"
    path.write_text(f"run_dir: {tmp_path / 'run'}\ndata:\n  datasets: [{dataset}]\n{extra}")
    return path


@pytest.mark.parametrize("text,value", [("3e-4", 3e-4), ("1e5", 1e5), ("-2.5E-3", -2.5e-3), ("2", 2.0)])
def test_exponent_numbers_parse_from_set_and_yaml(molecules, tmp_path, text, value):
    from scd_train.config import load_train_config

    path = _train_yaml(tmp_path, molecules)
    assert load_train_config(path, [f"optim.lr={text}"]).optim.lr == float(text) == value
    path = _train_yaml(tmp_path, molecules, f"optim:\n  lr: {text}\n")
    assert load_train_config(path).optim.lr == value


def test_integer_keys_take_whole_exponent_numbers(molecules, tmp_path):
    from scd_train.config import load_train_config

    cfg = load_train_config(_train_yaml(tmp_path, molecules, "steps: 1e5\n"), ["checkpoint_every=2e3"])
    assert (cfg.steps, cfg.checkpoint_every) == (100_000, 2_000)
    assert isinstance(cfg.steps, int)
    with pytest.raises(ConfigError, match=r"steps: expected an integer, got 1500.5"):
        load_train_config(_train_yaml(tmp_path, molecules, "steps: 1.5005e3\n"))


@pytest.mark.parametrize("text", [".inf", "-.inf", ".nan", "1e999"])
def test_non_finite_numbers_are_config_errors(molecules, tmp_path, capsys, text):
    from scd_train.config import load_train_config

    path = _train_yaml(tmp_path, molecules)
    with pytest.raises(ConfigError) as err:
        load_train_config(path, [f"optim.lr={text}"])
    _one_line(str(err.value), str(path), "optim.lr", "finite")
    assert scd_main(["train", str(path), "--set", f"optim.lr={text}"]) == 1
    _one_line(capsys.readouterr().err, "optim.lr", "finite")


def test_yaml_numbers_in_other_configs(tmp_path):
    path = tmp_path / "views.yaml"
    path.write_text("noisy_sigma: 4e-2\ncutoff: 6e0\n")
    cfg = load_yaml(ViewConfig, path)
    assert (cfg.noisy_sigma, cfg.cutoff) == (0.04, 6.0)
    path.write_text("cutoff: .inf\n")
    with pytest.raises(ConfigError, match=r"views.yaml.cutoff: expected a finite number"):
        load_yaml(ViewConfig, path)


# ------------------------------------------------------------------- 11. edge budget of the graphs
def test_pathological_cell_is_refused_before_its_images_are_built():
    cell = np.eye(3) * 0.2
    pos = np.array([[0.0, 0.0, 0.0], [0.1, 0.1, 0.05]])
    start = time.perf_counter()
    with pytest.raises(EdgeBudgetError) as err:
        radius_graph(pos, cell, np.ones(3, bool), cutoff=5.0, max_edges=2 * 512)
    assert time.perf_counter() - start < 1.0
    expected = 2 * 2 * (4 / 3 * math.pi * 5.0 ** 3) / 0.2 ** 3  # n^2 x ball / cell volume
    assert err.value.n_pairs == pytest.approx(expected, abs=1)
    assert err.value.n_pairs == pytest.approx(261_736, rel=0.01)  # the exact count measured in issue 13


def _pairs_ase(g) -> int:
    from ase import Atoms
    from ase.neighborlist import neighbor_list

    atoms = Atoms(numbers=g.atomic_numbers, positions=np.asarray(g.positions, np.float32).astype(np.float64),
                  cell=g.cell, pbc=g.pbc)
    return len(neighbor_list("i", atoms, 5.0, self_interaction=False))


def test_samples_over_the_edge_budget_are_counted_oversize_never_batched(real_graphs, tmp_path, caplog):
    graphs = [*real_graphs[:12], *[g for g in real_graphs if g.domain == "crystal"][:6]]
    root = tmp_path / "ds"
    write_dataset(graphs, root, config=WriterConfig(max_shard_samples=9))
    per_atom = 16
    over = {g.key for g in graphs if _pairs_ase(g) > per_atom * g.n_atoms}
    assert 0 < len(over) < len(graphs)
    views = ViewConfig(noise=False, max_edges_per_atom=per_atom, max_neighbors_periodic=None)
    cfg = DataConfig(datasets=(str(root),), seed=2, max_atoms=200, views=views,
                       mixture=MixtureConfig(group_by="source"))
    stream = make_stream(cfg)
    seen: set[str] = set()
    with caplog.at_level(logging.WARNING, logger="shards.stream.loader"):
        for batch in itertools.islice(stream, 300):
            assert not over & set(batch["keys"])
            edges = batch["edge_index"].shape[1]
            assert edges <= per_atom * int(batch["n_atoms"].sum())
            seen |= set(batch["keys"])
            if seen == {g.key for g in graphs} - over:
                break
    reasons = batch["oversize_reasons"]
    assert reasons["atoms"] == 0 and reasons["edges"] >= len(over) and batch["oversize"] == reasons["edges"]
    logged = {r.getMessage().split("'")[1] for r in caplog.records if "edge budget" in r.getMessage()}
    assert logged == over


def test_default_edge_budget_keeps_every_real_structure(real_graphs):
    from scd_train.views import make_views

    for g in real_graphs:
        make_views(g, ViewConfig(noise=False), seed=0, step=0)
