"""The streaming loader end to end: same seed -> same batches (noise included), resume is bitwise,
DataLoader worker count does not change the stream, corrupted shards are named or skipped."""
from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from scd_train.config import DataConfig
from scd_train.data import make_stream
from scd_train.views import ViewConfig
from shards.format.manifest import write_dataset
from shards.format.reader import ShardError
from shards.format.writer import WriterConfig
from shards.stream.mixture import MixtureConfig


@pytest.fixture(scope="module")
def dataset(real_graphs, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loader") / "ds"
    write_dataset(real_graphs, root, config=WriterConfig(max_shard_samples=25))
    return root


def _cfg(root: Path, **kw) -> DataConfig:
    base = dict(datasets=(str(root),), mixture=MixtureConfig(crop_protein_atoms=300), seed=7, max_atoms=400,
                views=ViewConfig(rotate=True))
    base.update(kw)
    return DataConfig(**base)


def _same(a: dict, b: dict) -> bool:
    keys = [k for k, v in a.items() if isinstance(v, np.ndarray)]
    return a["keys"] == b["keys"] and all(np.array_equal(a[k], b[k]) for k in keys)


def test_batches_are_deterministic_and_within_budget(dataset, real_graphs):
    """Same config -> same batches; every graph's atoms checked against the structure written (by key):
    molecules whole, crystals whole or an integer supercell, the 3,341-atom protein cropped to <= 300 of
    its own atoms; batches never over 400 atoms."""
    mix = MixtureConfig(strategy="proportions", weights={"molecule": 1, "crystal": 1, "protein": 1},
                        crop_protein_atoms=300)
    a = list(itertools.islice(make_stream(_cfg(dataset, mixture=mix)), 12))
    b = list(itertools.islice(make_stream(_cfg(dataset, mixture=mix)), 12))
    assert all(_same(x, y) for x, y in zip(a, b, strict=True))
    by_key = {g.key: g for g in real_graphs}
    seen = {"molecule": 0, "crystal": 0, "protein": 0}
    for batch in a:
        assert batch["z"].shape[0] == batch["n_atoms"].sum() <= 400
        assert batch["pos_noisy"].shape == batch["pos_clean"].shape == batch["noise"].shape
        ei = batch["edge_index_noisy"]
        assert (batch["batch"][ei[0]] == batch["batch"][ei[1]]).all(), "edges never cross graphs"
        for i, key in enumerate(batch["keys"]):
            g, z = by_key[key], batch["z"][batch["batch"] == i]
            seen[g.domain] += 1
            if g.domain == "protein":
                assert 0 < z.size <= 300
                assert not Counter(z.tolist()) - Counter(g.atomic_numbers.tolist()), "a crop keeps its own atoms"
            elif g.domain == "crystal":
                reps, rest = divmod(z.size, g.n_atoms)
                assert rest == 0 and reps in (1, 2, 4, 8) and (z == np.tile(g.atomic_numbers, reps)).all()
            else:
                assert (z == g.atomic_numbers).all()
    assert min(seen.values()) > 0, seen


def test_resume_is_bitwise_including_noise(dataset):
    full = list(itertools.islice(make_stream(_cfg(dataset)), 10))
    stream = make_stream(_cfg(dataset))
    head = list(itertools.islice(stream, 4))
    state = json.loads(json.dumps(stream.state_dict()))
    assert state["step"] == 4 and head[-1]["step"] == 3
    resumed = make_stream(_cfg(dataset))
    resumed.load_state_dict(state)
    tail = list(itertools.islice(resumed, 6))
    assert all(_same(x, y) for x, y in zip(full[4:], tail, strict=True))


def test_worker_count_does_not_change_stream(dataset):
    single = list(itertools.islice(make_stream(_cfg(dataset)), 8))
    w0 = list(itertools.islice(make_stream(_cfg(dataset), worker=0, num_workers=2), 4))
    w1 = list(itertools.islice(make_stream(_cfg(dataset), worker=1, num_workers=2), 4))
    merged = [b for pair in zip(w0, w1, strict=True) for b in pair]
    assert [b["step"] for b in merged] == list(range(8))
    assert all(_same(x, y) for x, y in zip(single, merged, strict=True))


def test_torch_dataloader_workers_match(dataset):
    torch = pytest.importorskip("torch")
    from scd_train.data import StatefulLoader
    from scd_train.dist import DistInfo

    cfg = _cfg(dataset)
    stream = make_stream(cfg)
    ref = list(itertools.islice(stream, 6))
    loader = StatefulLoader(cfg, DistInfo(0, 1, 0, torch.device("cpu")), num_workers=2)
    got = list(itertools.islice(iter(loader), 6))
    assert all(_same(x, y) for x, y in zip(ref, got, strict=True))
    assert torch.is_tensor(got[0]["z"]) and got[0]["step"] == 0
    # the state is that after the last batch handed out, not after the batches the workers prefetched
    assert loader.state_dict()["ranks"] == [json.loads(json.dumps(stream.state_dict()))]


def test_corrupt_shard_is_named_or_skipped(dataset, tmp_path):
    import shutil

    root = tmp_path / "ds"
    shutil.copytree(dataset, root)
    shard = root / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    data[520:560] = b"\xff" * 40
    shard.write_bytes(bytes(data))
    cfg = _cfg(root, mixture=MixtureConfig(), max_atoms=4000, views=ViewConfig())
    with pytest.raises(ShardError, match="shard-000000.tar"):
        list(itertools.islice(make_stream(cfg), 30))
    stream = make_stream(DataConfig(**{**cfg.__dict__, "on_corrupt": "skip"}))
    list(itertools.islice(stream, 30))
    assert stream.corrupt_skipped >= 1


def test_http_stream_equals_local(dataset, http_root, tmp_path):
    import shutil

    base, folder = http_root
    shutil.copytree(dataset, folder / "ds")
    local = list(itertools.islice(make_stream(_cfg(dataset)), 5))
    remote = list(itertools.islice(make_stream(_cfg(f"{base}/ds", cache_dir=str(tmp_path / "cache"))), 5))
    assert all(_same(x, y) for x, y in zip(local, remote, strict=True))
    assert any((tmp_path / "cache").iterdir())


def test_every_sample_once_per_pass_over_two_ranks_by_two_workers(real_graphs, tmp_path):
    molecules = [g for g in real_graphs if g.domain == "molecule"]
    root = tmp_path / "mol"
    write_dataset(molecules, root, config=WriterConfig(max_shard_samples=30))
    cfg = _cfg(root, mixture=MixtureConfig(), max_atoms=60)
    per_rank = []
    for rank in range(2):
        workers = [list(itertools.islice(make_stream(cfg, world_size=2, rank=rank, worker=w, num_workers=2), 40))
                   for w in range(2)]
        merged = sorted((b for w in workers for b in w), key=lambda b: b["step"])
        assert [b["step"] for b in merged] == list(range(80))
        keys = [k for b in merged for k in b["keys"]]
        per_rank.append(keys[: len(molecules) // 2])
    union = per_rank[0] + per_rank[1]
    assert sorted(union) == sorted(g.key for g in molecules), "one pass = every sample exactly once"


def test_preview_prints_exactly_the_loader_stream(dataset):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "shards", "shards", "preview", str(dataset), "--steps", "6",
                          "--seed", "7", "--max-atoms", "400", "--world-size", "2", "--rank", "1", "--json"],
                         capture_output=True, text=True, check=True)
    preview = [json.loads(line) for line in out.stdout.splitlines()][:-1]
    cfg = _cfg(dataset, mixture=MixtureConfig(), views=ViewConfig())  # the preview defaults: repeats as views
    stream = list(itertools.islice(make_stream(cfg, world_size=2, rank=1), 6))
    assert [p["keys"] for p in preview] == [b["keys"] for b in stream]
    assert [p["atoms"] for p in preview] == [int(b["z"].shape[0]) for b in stream]
