"""FrameStack, the trusted construction path of container blocks: every frame it builds is the sample (same
bytes) or the refusal (same field and reason) that ``AtomGraph(...)`` gives for the frame's own arrays."""
from __future__ import annotations

import numpy as np
import pytest

Z = np.array([8, 1, 1], dtype=np.uint8)


def _block(rows: list, writeable: bool = False) -> np.ndarray:
    arr = np.ascontiguousarray(np.array(rows, dtype=np.float32).reshape(len(rows), 3, 3))
    arr.flags.writeable = writeable
    return arr


def _outcome(make, *args, **kwargs):
    """('graph', encoded bytes) or ('error', field, reason) of one construction."""
    from shards.format.codec import encode
    from shards.format.schema import SchemaError

    try:
        return ("graph", encode(make(*args, **kwargs)))
    except SchemaError as exc:
        return ("error", exc.field, exc.reason)


def _frames() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    pos = rng.normal(size=(12, 3, 3)).tolist()
    frc = rng.normal(size=(12, 3, 3)).tolist()
    pos[1][0][0] = float("nan")
    pos[2][2][1] = float("inf")
    pos[3][1][2] = 3e19  # finite, but its squares overflow float32: refused like NaN
    frc[4][0][0] = float("nan")
    frc[5][2][2] = -float("inf")
    return _block(pos), _block(frc)


# per frame: (key, index, with_forces, scalars); hostile values in some of them
FRAME_ARGS = [
    ("ok-0", 0, True, {"energy": -1.5}),
    ("ok-1", 1, True, {"energy": 2.0}),
    ("ok-2", 2, True, {}),
    ("ok-3", 3, True, {}),
    ("ok-4", 4, True, {}),
    ("ok-5", 5, False, {}),  # NaN-free without its bad forces row: a sample
    ("bad.key", 6, True, {"energy": 1.0}),
    ("ok-7", -7, True, {}),
    ("ok-8", 8, True, {"energy": np.float32(0.5), "charge": np.int64(-1), "spin": 2}),
    ("ok-9", 9, True, {"energy": float("nan")}),
    ("ok-10", 10, True, {"properties": {"gap": 1.0, "bad": float("inf")}, "property_units": {"gap": "eV"}}),
    ("ok-11", 11, True, {"properties": {"gap": 1}, "property_units": {"lumo": "eV"}, "spin": 0}),
]


@pytest.mark.parametrize("common,shared_ok", [
    ({"atomic_numbers": Z}, True),
    ({"atomic_numbers": np.array([8, 1, 1]), "trajectory_id": "traj"}, True),  # int64, writeable: coerced once
    ({"atomic_numbers": np.array([8, 0, 1], dtype=np.uint8)}, False),  # a shared bad element: every frame refused
    ({"atomic_numbers": Z, "cell": np.eye(3) * 0.0, "pbc": np.array([True, False, False])}, False),  # singular
    ({"atomic_numbers": Z, "cell": np.eye(3) * 5.0, "pbc": np.ones(3, dtype=bool)}, True),
    ({"atomic_numbers": Z, "domain": "Bad Domain"}, False),
    ({"atomic_numbers": Z, "trajectory_id": ""}, False),
], ids=["plain", "coerced", "bad-element", "singular-cell", "periodic", "bad-domain", "bad-trajectory"])
def test_frame_stack_accepts_and_refuses_exactly_as_the_validator(common, shared_ok) -> None:
    """Every frame built from a stack is the same sample (same bytes), or the same refusal (same field and
    reason), as ``AtomGraph(...)`` built from the frame's own arrays."""
    from shards.format.frames import FrameStack
    from shards.format.schema import NO_PBC, ZERO_CELL, AtomGraph

    pos, frc = _frames()
    full = {"domain": "molecule", "source": "s", "source_file": "f", "cell": ZERO_CELL, "pbc": NO_PBC, **common}
    stack = FrameStack(full, pos, frc)
    outcomes = []
    for i, (key, index, with_forces, scalars) in enumerate(FRAME_ARGS):
        fast = _outcome(stack.graph, i, key=key, index=index, with_forces=with_forces, **scalars)
        slow = _outcome(AtomGraph, key=key, index=index, positions=pos[i].copy(),
                        forces=frc[i].copy() if with_forces else None, **full, **scalars)
        assert fast == slow, (i, fast, slow)
        outcomes.append(fast[0])
    if shared_ok:  # by hand: frames 1-3 bad positions, 4 bad forces (5 drops its bad forces), 6 key, 7 index,
        # 9 energy, 10 a property, 11 spin
        assert outcomes == ["graph", "error", "error", "error", "error", "graph", "error", "error", "graph",
                            "error", "error", "error"]
    else:
        assert set(outcomes) == {"error"}


def test_frame_stack_builds_valid_frames_without_the_per_record_validator(monkeypatch) -> None:
    """The block checks replace the per-record validator for good frames only; a bad frame and an untrusted
    block (writeable, so the frame's arrays would be copied) still go through it."""
    import shards.format.schema as schema
    from shards.format.frames import FrameStack
    from shards.format.schema import NO_PBC, ZERO_CELL

    calls = []
    real = schema.validate_graph
    monkeypatch.setattr(schema, "validate_graph", lambda g, *a: (calls.append(g.key), real(g, *a)))
    pos, frc = _frames()
    common = {"domain": "molecule", "source": "s", "source_file": "f", "atomic_numbers": Z, "cell": ZERO_CELL,
              "pbc": NO_PBC}
    stack = FrameStack(common, pos, frc)
    assert calls == ["probe"]  # the shared fields, once
    g = stack.graph(0, key="k0", index=0, energy=1.0)
    assert calls == ["probe"] and np.shares_memory(g.positions, pos) and not g.positions.flags.writeable
    with pytest.raises(schema.SchemaError):
        stack.graph(1, key="k1", index=1)
    assert calls == ["probe", "k1"]
    loose = FrameStack(common, _block(pos.tolist(), writeable=True), frc)
    g2 = loose.graph(0, key="k0", index=0, energy=1.0)
    assert calls[-1] == "k0" and not np.shares_memory(g2.positions, pos) and g2.equals(g)
    with pytest.raises(TypeError):
        FrameStack({**common, "bonds": np.zeros((0, 2))}, pos)  # only graph-level fields are shared
    with pytest.raises(TypeError):
        stack.graph(0, key="k0", index=0, positions=pos[1])  # a frame cannot swap its arrays
    with pytest.raises(TypeError):
        FrameStack({**common, "charge": 0}, pos).graph(0, key="k0", index=0, charge=1)  # nor what frames share


def test_finite_rows_is_the_validators_rule_on_every_row() -> None:
    from shards.format.frames import finite_rows

    rng = np.random.default_rng(5)
    scale = np.sqrt(np.finfo(np.float32).max / 9)  # sums of squares around the float32 limit
    rows = (rng.uniform(0.3, 1.6, size=(4000, 3, 3)) * scale).astype(np.float32)
    rows[::7, 0, 0] = np.nan
    rows[::11, 1, 1] = -np.inf
    rows[::13] = rng.normal(size=(3, 3))
    rows.flags.writeable = False
    expected = [np.isfinite(np.vdot(r, r)) for r in rows]  # the validator's test, row by row
    got = finite_rows(rows).tolist()
    assert got == expected and 0 < sum(got) < len(got)


def test_frame_stack_graphs_build_what_the_validator_builds() -> None:
    """``FrameStack.graphs`` (one loop per block, block labels) gives, frame by frame, the same sample (same bytes)
    or the same refusal (same field and reason) as ``AtomGraph(...)`` with the frame's own arrays and labels."""
    from shards.format.frames import FrameStack
    from shards.format.schema import NO_PBC, ZERO_CELL, AtomGraph, SchemaError

    pos, frc = _frames()
    n = len(pos)
    energy = [1.5, None, 2.0, 3.0, 4.0, 5.0, 6.0, float("inf"), 7.0, float("nan"), 8.0, 9.0]
    gap = [0.1, 0.2, None, 0.3, 0.4, 0.5, 0.6, 0.7, float("-inf"), 0.9, "one", 1.1]
    keys = [f"ok-{i}" for i in range(n)]
    keys[6] = "bad.key"
    with_forces = [True] * n
    with_forces[5] = False  # frame 5's forces are NaN: without them it is a sample
    common = {"domain": "molecule", "source": "s", "source_file": "f", "atomic_numbers": Z, "cell": ZERO_CELL,
              "pbc": NO_PBC, "trajectory_id": "t"}
    stack = FrameStack(common, pos, frc, energy=energy, properties={"gap": gap, "lumo": [None] * n},
                       property_units={"gap": "eV", "lumo": "eV"})
    got = list(stack.graphs(keys, 40, lambda r, exc: (r, exc), with_forces=with_forces))
    outcomes = []
    for i, item in enumerate(got):
        props = {"gap": gap[i]} if gap[i] is not None else None
        slow = _outcome(AtomGraph, key=keys[i], index=40 + i, positions=pos[i].copy(),
                        forces=frc[i].copy() if with_forces[i] else None, energy=energy[i], properties=props,
                        property_units=props and {"gap": "eV"}, **common)
        if isinstance(item, AtomGraph):
            from shards.format.codec import encode

            fast = ("graph", encode(item))
        else:
            assert item[0] == 40 + i and isinstance(item[1], SchemaError)
            fast = ("error", item[1].field, item[1].reason)
        assert fast == slow, (i, fast, slow)
        outcomes.append(fast[0])
    # by hand: 1-3 bad positions, 4 bad forces, 6 key, 7 energy inf, 8 gap -inf, 9 energy NaN, 10 gap not a number
    assert outcomes == ["graph", "error", "error", "error", "error", "graph", "error", "error", "error", "error",
                        "error", "graph"]


def test_frame_stack_graphs_with_file_keys() -> None:
    """Given a file's ``FileKeys``, ``graphs`` makes the block's keys itself and checks them once: the same items as
    with the key list, and a source whose keys cannot match the key pattern refuses every frame by its key."""
    from shards.format.codec import encode
    from shards.format.frames import FrameStack
    from shards.format.schema import NO_PBC, ZERO_CELL, AtomGraph, FileKeys, SchemaError

    pos, frc = _frames()
    common = {"domain": "molecule", "source": "s", "source_file": "f", "atomic_numbers": Z, "cell": ZERO_CELL,
              "pbc": NO_PBC}
    stack = FrameStack(common, pos, frc, energy=[1.0] * len(pos))
    keys = FileKeys("s", "f")
    assert keys.valid and not FileKeys("_s", "f").valid
    listed = list(stack.graphs(keys.many(range(7, 7 + len(pos))), 7, lambda r, exc: (r, str(exc))))
    made = list(stack.graphs(keys, 7, lambda r, exc: (r, str(exc))))
    assert [encode(g) if isinstance(g, AtomGraph) else g for g in listed] == \
        [encode(g) if isinstance(g, AtomGraph) else g for g in made]
    assert sum(isinstance(g, AtomGraph) for g in made) == 7  # frames 1-5 have bad rows
    refused = list(stack.graphs(FileKeys("_s", "f"), 7, lambda r, exc: exc))
    assert len(refused) == len(pos) and all(isinstance(e, SchemaError) and e.field == "key" for e in refused)
