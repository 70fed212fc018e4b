"""Property-based tests (Hypothesis) where the input space is large: the codec round trip of random valid
graphs, validation rejecting random invalid ones, the planner over random sizes / world sizes / worker
counts / mixtures, and radius graphs against a brute-force reference over random cells.

Examples are few (``max_examples`` 25-60) so the file runs in well under a minute on two cores; every
generator is seeded by Hypothesis and failures print the shrunk example."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shards.format.codec import decode, encode
from shards.format.schema import AtomGraph, SchemaError
from shards.stream.graph import radius_graph_with_offsets
from shards.stream.mixture import MixtureConfig
from shards.stream.plan import Planner, SampleTable

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------------------------------ graphs
_NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=12)
_FINITE = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
_LABELS4 = np.array([b"", b"A", b"CA", b"HOH", b"GLY", b"N1", b"ZN", b"HE21"], dtype="S4")


@st.composite
def graphs(draw) -> dict:
    """Keyword arguments of a valid AtomGraph: every optional field present or not."""
    n = draw(st.integers(1, 24))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    periodic = draw(st.lists(st.booleans(), min_size=3, max_size=3))
    kw: dict = dict(
        key=draw(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,30}", fullmatch=True)), domain=draw(_NAME.filter(
            lambda s: s[0].isalpha())), source=draw(_NAME), source_file=draw(st.text(max_size=20)),
        index=draw(st.integers(0, 2**40)), atomic_numbers=rng.integers(1, 119, n).astype(np.uint8),
        positions=rng.uniform(-50, 50, (n, 3)).astype(np.float32),
        cell=(np.diag(rng.uniform(2, 20, 3)) + rng.uniform(-1, 1, (3, 3))) if any(periodic) else np.zeros((3, 3)),
        pbc=np.array(periodic))
    if draw(st.booleans()):
        kw["charge"] = draw(st.integers(-5, 5))
        kw["spin"] = draw(st.integers(1, 6))
    if draw(st.booleans()):
        kw["energy"] = draw(_FINITE)
        kw["forces"] = rng.normal(size=(n, 3)).astype(np.float32)
    if draw(st.booleans()):
        props = draw(st.dictionaries(_NAME, _FINITE, min_size=1, max_size=4))
        kw["properties"] = props
        kw["property_units"] = {k: draw(st.sampled_from(["eV", "D", "bohr^3", ""])) for k in props}
    if n > 1 and draw(st.booleans()):
        b = draw(st.integers(0, 2 * n))
        kw["bonds"] = rng.integers(0, n, (b, 2)).astype(np.int32)
        kw["bond_order"] = rng.choice([1.0, 1.5, 2.0, 3.0], b).astype(np.float32)
    if draw(st.booleans()):
        kw["residue_index"] = rng.integers(-5, 500, n).astype(np.int32)
        kw["residue_name"], kw["chain"], kw["atom_name"] = (rng.choice(_LABELS4, n) for _ in range(3))
        kw["hetero"] = rng.random(n) < 0.3
    if draw(st.booleans()):
        kw["trajectory_id"] = draw(_NAME)
        kw["frame_time"] = draw(_FINITE)
    return kw


@FAST
@given(graphs())
def test_codec_round_trip_of_random_valid_graphs(kw):
    g = AtomGraph(**kw)
    buf = encode(g)
    back = decode(buf)
    assert back.equals(g) and back.key == kw["key"] and back.n_atoms == kw["atomic_numbers"].size
    np.testing.assert_array_equal(back.positions, kw["positions"])
    assert back.energy == kw.get("energy") and back.properties == kw.get("properties")
    assert encode(back) == buf, "encoding is a function of the graph only"


# one way to break a valid graph, each tied to the invariant it violates
CORRUPTIONS = {
    "nan position": lambda kw, r: {"positions": _with(kw["positions"], r, np.nan)},
    "inf force": lambda kw, r: {"forces": _with(np.zeros_like(kw["positions"]), r, np.inf)},
    "z = 0": lambda kw, r: {"atomic_numbers": _with(kw["atomic_numbers"].astype(np.int64), r, 0)},
    "z = 119": lambda kw, r: {"atomic_numbers": _with(kw["atomic_numbers"].astype(np.int64), r, 119)},
    "positions not N x 3": lambda kw, r: {"positions": np.zeros((kw["atomic_numbers"].size + 1, 3))},
    "zero atoms": lambda kw, r: {"atomic_numbers": np.zeros(0, np.uint8), "positions": np.zeros((0, 3))},
    "pbc without cell": lambda kw, r: {"pbc": np.array([True, False, False]), "cell": np.zeros((3, 3))},
    "singular cell": lambda kw, r: {"pbc": np.ones(3, bool), "cell": np.ones((3, 3))},
    "bond index out of range": lambda kw, r: {"bonds": np.array([[0, kw["atomic_numbers"].size]], np.int32),
                                              "bond_order": np.ones(1, np.float32)},
    "bonds without order": lambda kw, r: {"bonds": np.zeros((1, 2), np.int32), "bond_order": None},
    "spin 0": lambda kw, r: {"spin": 0},
    "energy nan": lambda kw, r: {"energy": float("nan")},
    "key with a slash": lambda kw, r: {"key": "a/" + kw["key"]},
    "key with a dot": lambda kw, r: {"key": kw["key"] + ".tar"},
    "empty source": lambda kw, r: {"source": ""},
    "negative index": lambda kw, r: {"index": -1 - r},
    "unit of an unknown property": lambda kw, r: {"property_units": {"nope_" + str(r): "eV"}, "properties": {}},
    "forces not N x 3": lambda kw, r: {"forces": np.zeros((kw["atomic_numbers"].size, 2), np.float32)},
}


def _with(a: np.ndarray, r: int, value) -> np.ndarray:
    out = np.array(a, dtype=np.float64 if isinstance(value, float) else a.dtype, copy=True)
    out.reshape(-1)[r % out.size] = value
    return out


@FAST
@given(graphs(), st.sampled_from(sorted(CORRUPTIONS)), st.integers(0, 10_000))
def test_validation_rejects_random_invalid_graphs(kw, corruption, r):
    bad = {**kw, **CORRUPTIONS[corruption](kw, r)}
    with pytest.raises(SchemaError):
        AtomGraph(**bad)


# ----------------------------------------------------------------------------------------- planner
def _table(n_atoms: np.ndarray, domain: np.ndarray) -> SampleTable:
    m = n_atoms.size
    z = np.zeros(m, np.int64)
    return SampleTable(dataset=z.astype(np.int16), shard=z.astype(np.int32), offset=np.arange(m), size=z,
                       n_atoms=n_atoms.astype(np.int32), domain=domain.astype(np.int16),
                       source=domain.astype(np.int16), trajectory=z.astype(np.uint64),
                       domain_names=["a", "b", "c"], source_names=["a", "b", "c"])


@st.composite
def planner_cases(draw) -> tuple:
    """Group sizes 0 or 10..30 (at least one group), atoms 1..30 per sample, 1..4 ranks, 1..3 workers."""
    counts = [draw(st.sampled_from([0, *range(10, 31)])) for _ in range(3)]
    if not any(counts):
        counts[draw(st.integers(0, 2))] = draw(st.integers(10, 30))
    domain = np.repeat(np.arange(3), counts)
    domain = domain[np.random.default_rng(draw(st.integers(0, 2**32 - 1))).permutation(domain.size)]
    sizes = np.array(draw(st.lists(st.integers(1, 30), min_size=domain.size, max_size=domain.size)))
    world = draw(st.integers(1, 4))
    workers = draw(st.integers(1, 3))
    budget = draw(st.integers(30, 120))
    weights = {d: draw(st.integers(1, 5)) for d, c in zip("abc", counts, strict=True) if c}
    return sizes, domain, world, workers, budget, weights, draw(st.integers(0, 2**31))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(planner_cases())
def test_planner_passes_budget_and_equal_steps(case):
    """Every rank gives a batch at every step, within the budget by the table's atom counts; a DataLoader
    worker (a fresh planner keeping steps s % k == w) reproduces its steps of the rank's stream; and
    interleaving the ranks' rows gives a global stream in which, per group, each consecutive run of n_g
    of that group's rows is a permutation of the group (every sample once per pass, across ranks)."""
    sizes, domain, world, workers, budget, weights, seed = case
    t = _table(sizes, domain)
    mix = MixtureConfig(strategy="proportions", weights=weights)
    steps = 4 * workers
    per_rank = []
    for rank in range(world):
        whole = Planner(t, mix, seed=seed, world_size=world, rank=rank, max_atoms=budget)
        batches = [whole.next_batch() for _ in range(steps)]
        assert [b.step for b in batches] == list(range(steps))
        for b in batches:
            assert b.rows.size > 0 and int(sizes[b.rows].sum()) <= budget
        w = (seed + rank) % workers
        worker = Planner(t, mix, seed=seed, world_size=world, rank=rank, max_atoms=budget)
        kept = [b for b in (worker.next_batch() for _ in range(steps)) if b.step % workers == w]
        assert len(kept) == steps // workers and all((k.rows == batches[k.step].rows).all() for k in kept)
        per_rank.append(np.concatenate([b.rows for b in batches]))
    n = min(r.size for r in per_rank)
    stream = np.stack([r[:n] for r in per_rank], axis=1).reshape(-1)
    for g in np.unique(domain):
        members = np.flatnonzero(domain == g)
        mine = stream[domain[stream] == g]
        whole_passes = mine[: mine.size // members.size * members.size].reshape(-1, members.size)
        assert all(sorted(p.tolist()) == members.tolist() for p in whole_passes)
        tail = mine[whole_passes.size:]
        assert len(set(tail.tolist())) == tail.size, "a partial pass repeats no sample"


# ------------------------------------------------------------------------------------ radius graph
def _brute_force(pos: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> dict:
    """All (src, dst, image) with |pos[src] + S @ cell - pos[dst]| < cutoff, by enumerating every image
    within reach: cutoff / (cell height) plus the fractional spread of the unwrapped positions."""
    inv = np.linalg.inv(cell)
    frac = pos @ inv
    reach = [int(math.ceil(cutoff * np.linalg.norm(inv[:, k]) + np.ptp(frac[:, k]))) + 1 if pbc[k] else 0
             for k in range(3)]
    out = {}
    for s in itertools.product(*[range(-r, r + 1) for r in reach]):
        d = np.linalg.norm(pos[:, None, :] + np.array(s, float) @ cell - pos[None, :, :], axis=-1)
        for src, dst in zip(*np.nonzero(d < cutoff), strict=True):
            if src != dst or any(s):
                out[(int(src), int(dst), s)] = float(d[src, dst])
    return out


@st.composite
def cells(draw) -> tuple:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    a = np.diag(rng.uniform(2.5, 8.0, 3)) + np.triu(rng.uniform(-1.5, 1.5, (3, 3)), 1)
    rot, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    cell = a @ rot
    n = draw(st.integers(1, 10))
    frac = rng.uniform(-0.5, 1.5, (n, 3))  # positions need not be wrapped
    pbc = np.array(draw(st.lists(st.booleans(), min_size=3, max_size=3)))
    return frac @ cell, cell, pbc, draw(st.floats(0.5, 5.0))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cells())
def test_radius_graph_equals_brute_force_on_random_cells(case):
    pos, cell, pbc, cutoff = case
    ei, off, dist = radius_graph_with_offsets(pos, cell, pbc, cutoff)
    ours = {(int(a), int(b), tuple(int(v) for v in o)): float(d)
            for a, b, o, d in zip(ei[0], ei[1], off, dist, strict=True)}
    ref = _brute_force(pos, cell if pbc.any() else np.eye(3), pbc, cutoff)
    near_cut = {k for k, d in ref.items() if abs(d - cutoff) < 1e-9}
    assert ours.keys() ^ ref.keys() <= near_cut, sorted(ours.keys() ^ ref.keys())[:5]
    assert all(abs(ours[k] - ref[k]) < 1e-6 for k in ours.keys() & ref.keys())
    assert not (off[:, ~pbc] != 0).any(), "no image shifts along non-periodic axes"
