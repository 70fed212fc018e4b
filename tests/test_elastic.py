"""Elastic resume: a stream saved on W ranks continues on W' ranks with every position of the global stream taken
exactly once across the switch (pure partition math, the planner, and gloo training runs 2 -> 1, 2 -> 3, 2 -> 2)."""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import yaml

from shards.format.manifest import write_dataset
from shards.format.writer import WriterConfig
from shards.stream.mixture import MixtureConfig
from shards.stream.partition import VirtualStream, redeal, stream_of
from shards.stream.plan import BLOCK, Planner, SampleTable, redeal_states


def _take(stream: VirtualStream, world: int, counts: list[int], start: list[int] | None = None
          ) -> tuple[list[int], list[int]]:
    """Rank r takes ``counts[r]`` virtual indices r, r + world, ... (from ``start[r]``); returns the global
    positions taken and each rank's next virtual index."""
    nxt = list(start) if start is not None else list(range(world))
    taken = []
    for r in range(world):
        for _ in range(counts[r]):
            taken.append(stream.position(nxt[r]))
            nxt[r] += world
    return taken, nxt


def test_identity_stream_gives_rank_r_the_positions_r_mod_w():
    taken, nxt = _take(VirtualStream(), 3, [4, 4, 4])
    assert sorted(taken) == list(range(12)) and nxt == [12, 13, 14]
    assert _take(VirtualStream(), 3, [2, 0, 0])[0] == [0, 3]


@pytest.mark.parametrize("worlds", [(2, 3), (2, 1), (3, 2, 5), (4, 1, 3, 2), (2, 2, 7, 1)])
def test_successive_redeals_take_every_position_exactly_once(worlds):
    """Ranks advance unevenly (random counts, some ranks not at all); after each switch of world size the
    positions taken so far and later never repeat, and none below the slowest rank is left out."""
    rng = np.random.default_rng(len(worlds) * 100 + sum(worlds))
    stream, nxt = VirtualStream(), None
    taken: list[int] = []
    for phase, world in enumerate(worlds):
        if phase:
            stream = redeal(stream, nxt)
            nxt = None
        part, nxt = _take(stream, world, rng.integers(0, 40, world).tolist())
        taken += part
    assert len(taken) == len(set(taken)), "a position was taken twice"
    frontier = min(stream.position(v) for v in nxt)
    assert set(range(frontier)) <= set(taken), "a position below every rank's next one was never taken"
    # finish: every rank runs far enough that all of the first 500 positions are taken
    final, _ = _take(stream, worlds[-1], [600] * worlds[-1], nxt)
    total = taken + final
    assert len(total) == len(set(total))
    assert set(range(500)) <= set(total)


def test_redeal_example_by_hand():
    # 2 ranks: rank 0 took 0, 2, 4 (next 6); rank 1 took 1 (next 3). Left below 6: 3, 5. Then 6, 7, ...
    s = redeal(VirtualStream(), [6, 3])
    assert s == VirtualStream((3, 5), 6)
    assert [s.position(v) for v in range(5)] == [3, 5, 6, 7, 8]
    # 3 ranks on that stream: rank 0 takes v=0,3 (positions 3, 7); rank 1 nothing; rank 2 v=2 (position 6)
    t = redeal(s, [6, 1, 5])
    assert t == VirtualStream((5, 8, 9), 10)
    # the whole explicit list not yet reached stays in order
    assert redeal(VirtualStream((1, 4, 9, 12), 20), [0, 1]) == VirtualStream((1, 4, 9, 12), 20)


def test_bad_states_are_refused():
    with pytest.raises(ValueError, match="modulo 2"):
        redeal(VirtualStream(), [3, 3])
    with pytest.raises(ValueError, match="strictly increasing"):
        VirtualStream((4, 2), 9)
    with pytest.raises(ValueError, match="below base"):
        VirtualStream((4, 9), 9)
    assert stream_of([]) == VirtualStream() and stream_of([[6, 3], [6, 1, 5]]) == VirtualStream((5, 8, 9), 10)


# ------------------------------------------------------------------------------------------- the planner
def _table(m: int, seed: int = 0) -> SampleTable:
    """m molecules of 3..40 atoms in two sources (a mixture of two groups with their own passes)."""
    rng = np.random.default_rng(seed)
    z = np.zeros(m, np.int64)
    src = (rng.random(m) < 0.3).astype(np.int16)
    return SampleTable(dataset=z.astype(np.int16), shard=z.astype(np.int32), offset=np.arange(m), size=z,
                       n_atoms=rng.integers(3, 40, m).astype(np.int32), domain=z.astype(np.int16), source=src,
                       trajectory=z.astype(np.uint64), domain_names=["molecule"], source_names=["a", "b"])


def _planners(t: SampleTable, world: int, states: list[dict] | None = None) -> list[Planner]:
    out = []
    for r in range(world):
        p = Planner(t, MixtureConfig(group_by="source"), seed=4, world_size=world, rank=r, max_atoms=150)
        if states is not None:
            p.load_state_dict(json.loads(json.dumps(states[r])))
        out.append(p)
    return out


def _steps(planners: list[Planner], steps: int, out: dict[int, int]) -> None:
    """Run every planner ``steps`` steps; record position -> row of every sample they plan."""
    for p in planners:
        for _ in range(steps):
            b = p.next_batch()
            assert b.positions.size == b.rows.size
            for pos, row in zip(b.positions.tolist(), b.rows.tolist(), strict=True):
                assert pos not in out, f"position {pos} planned twice"
                out[pos] = row


@pytest.mark.parametrize("worlds", [(2, 1), (2, 3), (2, 3, 1), (3, 2, 4)])
def test_planner_redeal_continues_the_global_stream(worlds):
    """Ranks run 6 steps on W, then on W' (and W''): the positions planned over all phases are distinct, every
    position up to the slowest rank is planned, each position's row is the row of that position in the
    single-rank stream (mixture draws and group passes continue), every row of each group's first pass is
    planned exactly once, the step carries over and the seen counts add up."""
    t = _table(60)
    reference = Planner(t, MixtureConfig(group_by="source"), seed=4, world_size=1, rank=0, max_atoms=100_000)
    ref_rows = np.concatenate([reference.next_batch().rows for _ in range(2)])
    planned: dict[int, int] = {}
    planners = _planners(t, worlds[0])
    _steps(planners, 6, planned)
    for phase, world in enumerate(worlds[1:], start=1):
        states = redeal_states([p.state_dict() for p in planners], world)
        assert [s["step"] for s in states] == [6 * phase] * world
        planners = _planners(t, world, states)
        _steps(planners, 6, planned)
    frontier = min(p.position for p in planners)
    assert set(range(frontier)) <= set(planned), "a position below every rank's next one was skipped"
    assert all(ref_rows[pos] == row for pos, row in planned.items()), "a position maps to another row"
    for g in (0, 1):
        members = np.flatnonzero(t.source == g)
        first_pass = [pos for pos in range(ref_rows.size) if t.source[ref_rows[pos]] == g][: members.size]
        assert first_pass[-1] < frontier, "the test must run past the end of the first pass"
        assert sorted(planned[pos] for pos in first_pass) == members.tolist(), f"group {g}: not each row once"
    seen = sum(p.seen for p in planners)
    assert seen.tolist() == [sum(t.source[row] == g for row in planned.values()) for g in (0, 1)]


def test_planner_moves_its_group_cursors_back_to_an_earlier_block():
    """A state whose next position lies blocks before its cached cursors (as after a redeal that hands a slow
    rank's gaps to a rank that was ahead) plans the rows of the uninterrupted stream there."""
    t = _table(500)
    mix = MixtureConfig(group_by="source")
    reference = Planner(t, mix, seed=4, max_atoms=200_000)
    ref_rows = np.concatenate([reference.next_batch().rows for _ in range(2)])
    assert ref_rows.size > 2 * BLOCK + 200
    ahead = Planner(t, mix, seed=4, max_atoms=200_000)
    ahead.next_batch()
    ahead.next_batch()
    state = ahead.state_dict()
    assert state["block_no"] >= 2
    back = Planner(t, mix, seed=4, max_atoms=300)
    back.load_state_dict({**state, "pos": 100, "max_atoms": 300})
    b = back.next_batch()
    assert b.positions[0] == 100 and b.rows.tolist() == ref_rows[100:100 + b.rows.size].tolist()


def test_same_world_size_resume_keeps_every_rank_state():
    """W -> W is not dealt again: each rank's state loads as saved (so same-size resume stays bitwise)."""
    t = _table(300)
    first = _planners(t, 2)
    for p in first:
        for _ in range(3):
            p.next_batch()
    states = [p.state_dict() for p in first]
    assert redeal_states(states, 2) == states
    again = _planners(t, 2, states)
    cont = [[p.next_batch().rows.tolist() for _ in range(3)] for p in first]
    assert cont == [[p.next_batch().rows.tolist() for _ in range(3)] for p in again]


# ------------------------------------------------------------------------------------ training on gloo
MODEL = {"kind": "scd", "backbone": "et", "preset": "small", "hidden": 32, "layers": 2, "heads": 4, "num_rbf": 8}
K, TOTAL = 3, 9  # steps on 2 ranks, then the resumed run goes on to TOTAL


class _Recording:
    """Iterates the trainer's loader and writes (step, keys, stream positions) of every batch to a file."""

    def __init__(self, loader, out: Path) -> None:
        self.loader, self.out = loader, out

    def __iter__(self):
        with self.out.open("a") as f:
            for batch in self.loader:
                f.write(json.dumps({"step": batch["step"], "keys": list(batch["keys"]),
                                    "positions": [int(p) for p in batch["positions"]]}) + "\n")
                f.flush()
                yield batch


def _rank_main(rank: int, world: int, port: int, cfg: str, overrides: list[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from scd_train.config import load_train_config
    from scd_train.dist import cleanup
    from scd_train.trainer import Trainer

    trainer = Trainer(load_train_config(cfg, overrides))
    trainer.loader = _Recording(trainer.loader, Path(out) / f"rank{rank}.jsonl")
    trainer.fit()
    cleanup()


def _train(world: int, cfg: Path, out: Path, *overrides: str) -> list[dict]:
    """Train on ``world`` gloo processes; returns the recorded batches of all ranks."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out.mkdir(parents=True)
    mp.spawn(_rank_main, args=(world, port, str(cfg), list(overrides), str(out)), nprocs=world, join=True)
    return [json.loads(x) for f in sorted(out.glob("rank*.jsonl")) for x in f.read_text().splitlines()]


@pytest.fixture(scope="module")
def molecules(real_graphs, tmp_path_factory) -> tuple[Path, list[str]]:
    graphs = [g for g in real_graphs if g.domain == "molecule"][:60]
    root = tmp_path_factory.mktemp("elastic") / "ds"
    write_dataset(graphs, root, config=WriterConfig(max_shard_samples=25))
    return root, [g.key for g in graphs]


def _config(tmp: Path, dataset: Path, name: str) -> Path:
    cfg = {"run_dir": str(tmp / name), "steps": TOTAL, "seed": 7, "log_every": 1, "checkpoint_every": 1000,
           "tensorboard": False, "progress": False,
           "data": {"datasets": [str(dataset)], "max_atoms": 60, "seed": 7}, "model": MODEL,
           "optim": {"lr": 1e-3, "warmup_steps": 2}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_two_ranks_then_one_and_three_ranks_see_the_pass_once(molecules, tmp_path):
    """2 ranks train K steps and checkpoint; copies of the run resume on 1 and on 3 ranks until TOTAL. Across the
    switch no stream position repeats, every sample of the first pass (its keys) is seen exactly once, and the
    resumed run logs finite losses for steps K+1..TOTAL."""
    dataset, keys = molecules
    first = _train(2, _config(tmp_path, dataset, "first"), tmp_path / "rec-first", f"stop_after={K}")
    assert sorted(b["step"] for b in first) == sorted(list(range(K)) * 2)
    for world in (1, 3):
        run = tmp_path / f"w{world}"
        shutil.copytree(tmp_path / "first", run)
        after = _train(world, _config(tmp_path, dataset, f"w{world}"), tmp_path / f"rec-{world}")
        assert sorted(b["step"] for b in after) == sorted(list(range(K, TOTAL)) * world)
        seen = [(p, k) for b in first + after for p, k in zip(b["positions"], b["keys"], strict=True)]
        positions = [p for p, _ in seen]
        assert len(positions) == len(set(positions)), f"2 -> {world}: a stream position was planned twice"
        first_pass = sorted(k for p, k in seen if p < len(keys))
        assert first_pass == sorted(keys), f"2 -> {world}: the first pass is not each sample exactly once"
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, TOTAL + 1))
        assert all(math.isfinite(r["loss"]) for r in rows)
        state = json.loads((run / f"step-{TOTAL:08d}" / "state.json").read_text())
        assert len(state["loader"]["ranks"]) == world


# ------------------------------------------------------------------------------------------ checkpoints
def _parts(tmp: Path, world: int = 1, rank: int = 0):
    from scd_train.config import DataConfig
    from scd_train.data import StatefulLoader
    from scd_train.dist import DistInfo

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched.step()
    info = DistInfo(rank, world, rank, torch.device("cpu"))
    loader = StatefulLoader(DataConfig(datasets=(str(tmp / "unused"),)), info)
    return {"model": model, "optimizer": opt, "scheduler": sched, "loader": loader}


def _planner_state(t: SampleTable, world: int, rank: int, steps: int) -> dict:
    p = _planners(t, world)[rank]
    for _ in range(steps):
        p.next_batch()
    return p.state_dict()


def test_checkpointer_round_trip_reads_format_1_and_refuses_newer_formats(tmp_path):
    from scd_train.checkpoint import Checkpointer

    t = _table(200)
    saved = _parts(tmp_path)
    saved["loader"].load_state_dict({"ranks": [_planner_state(t, 1, 0, 3)]})
    path = Checkpointer(tmp_path / "run", saved).save(7, {"note": "x"})
    assert path is not None and sorted(p.name for p in path.iterdir()) == ["model.safetensors", "optim.safetensors",
                                                                           "state.json"]
    doc = json.loads((path / "state.json").read_text())
    assert doc["format"] == 2 and doc["step"] == 7 and doc["parts"] == ["loader", "model", "optimizer", "scheduler"]

    fresh = _parts(tmp_path)
    torch.nn.init.zeros_(fresh["model"].weight)
    Checkpointer(tmp_path / "run", fresh).load(path)
    assert torch.equal(fresh["model"].weight, saved["model"].weight)
    assert fresh["scheduler"].state_dict() == saved["scheduler"].state_dict()
    a, b = fresh["optimizer"].state_dict()["state"], saved["optimizer"].state_dict()["state"]
    assert all(torch.equal(a[0][k], b[0][k]) for k in ("exp_avg", "exp_avg_sq"))
    assert fresh["loader"].rank_state() == _planner_state(t, 1, 0, 3)

    # the layout written before the format key (2 ranks' states under "sampler_states"): rank 1 of 2 gets its
    # own state, one rank the re-dealt stream
    two = [_planner_state(t, 2, r, 3) for r in range(2)]
    old = {k: v for k, v in doc.items() if k not in ("format", "parts", "loader")}
    (path / "state.json").write_text(json.dumps({**old, "sampler_states": two}))
    again = _parts(tmp_path, world=2, rank=1)
    assert Checkpointer(tmp_path / "run", again).load(path)["step"] == 7
    assert again["loader"].rank_state() == two[1]
    one = _parts(tmp_path)
    Checkpointer(tmp_path / "run", one).load(path)
    assert one["loader"].rank_state() == redeal_states(two, 1)[0] and one["loader"].rank_state()["deals"]

    (path / "state.json").write_text(json.dumps({**doc, "format": 3}))
    with pytest.raises(ValueError, match="format 3 is newer"):
        Checkpointer(tmp_path / "run", _parts(tmp_path)).load(path)
    (path / "state.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"no \['ema'\] part"):
        Checkpointer(tmp_path / "run", {**_parts(tmp_path), "ema": torch.nn.Linear(3, 2)}).load(path)
