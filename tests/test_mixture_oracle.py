"""The mixed-domain sampler's core promise, checked by an oracle outside the planner: the domains of the
samples actually emitted (read from the table/index rows or from the keys of the decoded samples) match
shares written out here by hand. Nothing is compared with the planner's own counters or probabilities."""
from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from scd_train.config import DataConfig
from scd_train.data import make_stream
from scd_train.views import ViewConfig
from shards.config import ConfigError
from shards.format.manifest import write_dataset
from shards.format.schema import AtomGraph, make_key
from shards.format.writer import WriterConfig
from shards.stream.mixture import MixtureConfig, group_probabilities, load_mixture
from shards.stream.plan import Planner, SampleTable

DOMAINS = ["molecule", "protein", "crystal", "md"]
# samples per domain in the synthetic table; md: 40 trajectories x 50 frames
SIZES = {"molecule": 8000, "protein": 1000, "crystal": 3000, "md": 2000}


def _table() -> SampleTable:
    """A table whose rows are grouped by domain (row ranges known here), atoms small enough to never crop."""
    dom = np.repeat(np.arange(4, dtype=np.int16), [SIZES[d] for d in DOMAINS])
    m = dom.size
    rng = np.random.default_rng(0)
    n_atoms = rng.integers(3, 60, m).astype(np.int32)
    traj = np.zeros(m, np.uint64)
    traj[dom == 3] = np.repeat(np.arange(1, 41, dtype=np.uint64), 50)
    z = np.zeros(m, np.int64)
    order = rng.permutation(m)  # rows of all domains interleaved, as in a real multi-dataset table
    return SampleTable(dataset=z.astype(np.int16), shard=z.astype(np.int32), offset=np.arange(m), size=z,
                       n_atoms=n_atoms[order], domain=dom[order], source=dom[order].copy(),
                       trajectory=traj[order], domain_names=list(DOMAINS),
                       source_names=[f"src-{d}" for d in DOMAINS])


def _emitted_shares(planner: Planner, table: SampleTable, n: int) -> dict[str, float]:
    """Shares of each domain among the first >= n rows the planner emits, domains read from the table."""
    rows: list[np.ndarray] = []
    total = 0
    while total < n:
        b = planner.next_batch().rows
        rows.append(b)
        total += b.size
    counts = np.bincount(table.domain[np.concatenate(rows)], minlength=len(DOMAINS))
    return {d: float(counts[i]) / total for i, d in enumerate(DOMAINS)}


# expected shares, worked out by hand from SIZES (and the trajectory cap) for each strategy
CASES = [
    pytest.param(MixtureConfig(strategy="proportions", weights={"molecule": 4, "protein": 1, "crystal": 3, "md": 2}),
                 {"molecule": 0.40, "protein": 0.10, "crystal": 0.30, "md": 0.20}, id="proportions"),
    # natural: 8000 : 1000 : 3000 : 2000 of 14000
    pytest.param(MixtureConfig(), {"molecule": 0.5714, "protein": 0.0714, "crystal": 0.2143, "md": 0.1429},
                 id="natural"),
    # temperature 2: sqrt sizes 89.44 : 31.62 : 54.77 : 44.72 (sum 220.56)
    pytest.param(MixtureConfig(strategy="temperature", temperature=2.0),
                 {"molecule": 0.4055, "protein": 0.1434, "crystal": 0.2483, "md": 0.2028}, id="temperature"),
    # weights: crystal x5 -> 8000 : 1000 : 15000 : 2000 of 26000
    pytest.param(MixtureConfig(strategy="weights", weights={"crystal": 5.0}),
                 {"molecule": 0.3077, "protein": 0.0385, "crystal": 0.5769, "md": 0.0769}, id="weights"),
    # natural with at most 5 frames per trajectory: md counts 40 x 5 = 200 units -> 8000 : 1000 : 3000 : 200
    pytest.param(MixtureConfig(max_frames_per_trajectory=5),
                 {"molecule": 0.6557, "protein": 0.0820, "crystal": 0.2459, "md": 0.0164}, id="trajectory-cap"),
]


@pytest.mark.parametrize(("mix", "expected"), CASES)
def test_emitted_domains_match_hand_written_shares(mix, expected):
    t = _table()
    shares = _emitted_shares(Planner(t, mix, seed=11, max_atoms=400), t, 12_000)
    assert all(abs(shares[d] - expected[d]) < 0.015 for d in DOMAINS), (shares, expected)


def test_mix_holds_on_every_rank():
    t = _table()
    mix = CASES[0].values[0]
    for rank in range(3):
        shares = _emitted_shares(Planner(t, mix, seed=2, world_size=3, rank=rank, max_atoms=400), t, 6000)
        assert all(abs(shares[d] - v) < 0.02 for d, v in CASES[0].values[1].items()), (rank, shares)


def _graphs() -> list[AtomGraph]:
    """Four domains, 6 to 12 atoms each; the domain of every key is known here, not read from the dataset."""
    rng = np.random.default_rng(3)
    out = []
    counts = {"molecule": 60, "protein": 8, "crystal": 20, "md": 30}
    for domain, count in counts.items():
        for i in range(count):
            n = int(rng.integers(6, 13))
            pos = rng.uniform(0, 6, (n, 3))
            periodic = domain == "crystal"
            out.append(AtomGraph(
                key=make_key(domain, f"{domain}.src", i), domain=domain, source=domain, source_file=f"{domain}.src",
                index=i, atomic_numbers=rng.integers(1, 10, n), positions=pos,
                cell=np.eye(3) * 7.0 if periodic else np.zeros((3, 3)), pbc=np.full(3, periodic),
                trajectory_id="traj" if domain == "md" else None, frame_time=float(i) if domain == "md" else None))
    return out


def test_loader_keys_follow_the_mixture(tmp_path):
    graphs = _graphs()
    domain_of = {g.key: g.domain for g in graphs}
    root = tmp_path / "ds"
    write_dataset(graphs, root, config=WriterConfig(max_shard_samples=16))
    mix = MixtureConfig(strategy="proportions", weights={"molecule": 1, "protein": 2, "crystal": 3, "md": 4})
    cfg = DataConfig(datasets=(str(root),), mixture=mix, seed=5, max_atoms=600, views=ViewConfig(noise=False))
    counts: Counter[str] = Counter()
    for batch in itertools.islice(make_stream(cfg), 60):
        counts.update(domain_of[k] for k in batch["keys"])
    total = sum(counts.values())
    shares = {d: counts[d] / total for d in DOMAINS}
    expected = {"molecule": 0.1, "protein": 0.2, "crystal": 0.3, "md": 0.4}
    assert total > 2500
    assert all(abs(shares[d] - expected[d]) < 0.03 for d in DOMAINS), (shares, total)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"temperature": 0.0}, "mixture.temperature must be > 0, got 0.0"),
    ({"temperature": -2.0}, "mixture.temperature must be > 0, got -2.0"),
    ({"weights": {"md": -1.0}}, "mixture weights must be >= 0"),
    ({"default_weight": -0.5}, "mixture weights must be >= 0"),
    ({"max_frames_per_trajectory": 0}, "mixture.max_frames_per_trajectory must be >= 1"),
])
def test_bad_mixture_specs_are_refused(kwargs, match):
    with pytest.raises(ConfigError) as err:
        MixtureConfig(**kwargs)
    assert str(err.value) == match


def test_mixture_edge_values_and_group_edge_cases():
    MixtureConfig(temperature=1e-9, weights={"md": 0.0}, default_weight=0.0, max_frames_per_trajectory=1)
    # an empty group is left out, a group of one sample is kept
    assert group_probabilities(MixtureConfig(), {"a": 1, "b": 0, "c": 3}) == pytest.approx({"a": 0.25, "c": 0.75})
    # groups absent from weights get default_weight: 2 x 10 vs 0.5 x 30
    got = group_probabilities(MixtureConfig(strategy="weights", weights={"a": 2.0}, default_weight=0.5),
                              {"a": 10, "b": 30})
    assert got == pytest.approx({"a": 20 / 35, "b": 15 / 35})
    # weights summing to less than one are fine (only the ratio matters)
    small = MixtureConfig(strategy="proportions", weights={"a": 0.25, "b": 0.125})
    assert group_probabilities(small, {"a": 5, "b": 7}) == pytest.approx({"a": 2 / 3, "b": 1 / 3})
    with pytest.raises(ValueError, match="^the datasets hold no samples$"):
        group_probabilities(MixtureConfig(), {"a": 0})
    with pytest.raises(ConfigError, match=r"^mixture.weights names \['zz'\], which no dataset has "
                                          r"\(groups by domain: \['a'\]\)$"):
        group_probabilities(MixtureConfig(strategy="weights", weights={"zz": 1.0}), {"a": 2})
    with pytest.raises(ConfigError, match="^mixture weights are all zero$"):
        group_probabilities(MixtureConfig(strategy="proportions", default_weight=0.0), {"a": 2, "b": 3})


def test_mixture_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "mix.yaml"
    path.write_text("strategy: proportions\nweights: {molecule: 3, md: 1}\nmax_frames_per_trajectory: 4\n")
    cfg = load_mixture(path)
    assert cfg == MixtureConfig(strategy="proportions", weights={"molecule": 3, "md": 1}, max_frames_per_trajectory=4)
    assert load_mixture(path, ["temperature=2.5"]).temperature == 2.5
    assert load_mixture(None) == MixtureConfig()
    path.write_text("strategy: proportions\nwieghts: {molecule: 3}\n")
    with pytest.raises(ConfigError, match="wieghts"):
        load_mixture(path)


def test_domain_draws_depend_on_the_seed_and_only_on_it():
    """The sequence of domains drawn is a function of the seed: same seed, same sequence; another seed,
    another sequence (not only another order of samples within each domain)."""
    t = _table()
    mix = CASES[0].values[0]

    def domains(seed: int) -> np.ndarray:
        p = Planner(t, mix, seed=seed, max_atoms=400)
        return t.domain[np.concatenate([p.next_batch().rows for _ in range(40)])][:300]

    assert (domains(1) == domains(1)).all()
    assert (domains(1) != domains(2)).any()


def test_nothing_fits_is_an_error_and_one_sample_is_a_whole_mix():
    z = np.zeros(3, np.int64)
    t = SampleTable(dataset=z.astype(np.int16), shard=z.astype(np.int32), offset=np.arange(3), size=z,
                    n_atoms=np.full(3, 50, np.int32), domain=z.astype(np.int16), source=z.astype(np.int16),
                    trajectory=z.astype(np.uint64), domain_names=["crystal"], source_names=["s"])
    with pytest.raises(ValueError, match=r"^no sample fits the atom budget of 10 \(\d+ oversize samples so far\); "
                                         r"raise max_atoms or crop$"):
        Planner(t, MixtureConfig(), seed=0, max_atoms=10).next_batch()
    p = Planner(t, MixtureConfig(), seed=0, max_atoms=60)
    assert p.next_batch().rows.size == 1 and p.realised_mix() == {"crystal": 1.0}


def test_cell_repeats_per_axis_within_the_budget():
    """Planner-decided cell repeats: only the repeat domains, each axis 1..max_repeat drawn independently,
    and the supercell (index atoms x product of repeats) always within the budget."""
    from shards.stream.plan import RepeatSpec

    m = 400
    dom = np.where(np.arange(m) % 4 == 0, 0, 2).astype(np.int16)  # molecules and crystals
    n_atoms = np.where(np.arange(m) % 8 == 2, 60, 5).astype(np.int32)  # some crystals too big to repeat
    z = np.zeros(m, np.int64)
    t = SampleTable(dataset=z.astype(np.int16), shard=z.astype(np.int32), offset=np.arange(m), size=z,
                    n_atoms=n_atoms, domain=dom, source=dom.copy(), trajectory=z.astype(np.uint64),
                    domain_names=list(DOMAINS), source_names=[f"s{i}" for i in range(4)])
    p = Planner(t, MixtureConfig(), seed=3, max_atoms=100, repeat=RepeatSpec(p=0.5, max_repeat=3))
    reps = []
    for _ in range(60):
        b = p.next_batch()
        assert (b.atoms == n_atoms[b.rows] * b.repeats.prod(axis=1)).all() and b.atoms.sum() <= 100
        assert (b.repeats[dom[b.rows] == 0] == 1).all(), "molecules are never repeated"
        reps.append(b.repeats[dom[b.rows] == 2])
    r = np.concatenate(reps)
    assert r.min() == 1 and r.max() == 3
    assert ((r == 2).any(axis=1) & (r == 3).any(axis=1)).any(), "axes are drawn independently"
    assert (r[:, 0] != r[:, 1]).any() and (r[:, 1] != r[:, 2]).any()
