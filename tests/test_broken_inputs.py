"""Bad input, nothing lost: every record of every broken file is a sample or a reject with a reason."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ingest.plugin import Reject, safe_convert
from ingest.registry import converter_for, get_converter
from shards.format.schema import AtomGraph

BROKEN = Path(__file__).parent / "data" / "broken"
# file -> (accepted, rejected, rejects with record None, a word every reject reason contains)
EXPECTED = {
    "truncated.sdf": (1, 1, 0, ""),
    "garbage.sdf": (0, 1, None, ""),
    "flat_2d.sdf": (0, 1, 0, "2D"),
    "zero_atoms.sdf": (0, 1, 0, "zero atoms"),
    "garbage.pdb": (0, 1, 1, ""),
    "wrong_suffix.pdb": (0, 1, 1, ""),
    "unknown_element.pdb": (0, 1, 0, "element"),
    "garbage.cif": (0, 1, 1, ""),
    "empty.cif": (0, 1, 1, ""),
    "truncated.cif": (0, 1, None, ""),
    "disordered.cif": (0, 1, 0, "disordered"),
    "garbage.xyz": (0, 1, 1, ""),
    "nan_coords.xyz": (1, 2, 0, "positions"),
    "zero_atoms.xyz": (0, 1, None, ""),
    "unknown_element.xyz": (0, 1, 0, "Qq"),
    "mismatch.xtc": (0, 1, 1, "topology"),
    "nan_frame.zarr": (3, 1, 0, "positions"),
}
COMPANIONS = {"mismatch.gro"}  # auto-paired topology (same stem) of mismatch.xtc, with one atom too few


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A copy of the corpus: readers may write caches next to their inputs (MDAnalysis XTC offsets)."""
    return Path(shutil.copytree(BROKEN, tmp_path_factory.mktemp("corpus") / "broken"))


def _run(conv, path: Path, options=None, records: range | None = None) -> list[AtomGraph | Reject]:
    opts = conv.parse_options(options or {})
    return list(safe_convert(conv, path, opts, source="broken", file_id=path.name, records=records))


def _check_accounting(conv, path: Path, items: list, options=None) -> None:
    rejects = [r for r in items if isinstance(r, Reject)]
    assert all(r.reason and r.converter == conv.name and r.file == path.name for r in rejects)
    if any(r.record is None for r in rejects):
        assert len(items) == 1, "an unreadable file is exactly one reject"
        return
    indices = [r.record if isinstance(r, Reject) else r.index for r in items]
    assert sorted(indices) == list(range(len(items))), "each record exactly once"
    try:
        n = conv.count_records(path, conv.parse_options(options or {}))
    except Exception:  # noqa: BLE001 - a file too broken to count is fine; the records are still accounted
        n = None
    if n is not None:
        assert len(items) == n


def test_corpus_is_complete() -> None:
    names = {p.name for p in BROKEN.iterdir() if not p.name.startswith(".")}
    assert names == set(EXPECTED) | COMPANIONS


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_broken_file_accounted(name: str, corpus: Path) -> None:
    path = corpus / name
    conv = converter_for(path)()
    items = _run(conv, path)
    accepted, rejected, n_none, word = EXPECTED[name]
    rejects = [r for r in items if isinstance(r, Reject)]
    assert (len(items) - len(rejects), len(rejects)) == (accepted, rejected), rejects
    if n_none is not None:
        assert sum(r.record is None for r in rejects) == n_none, rejects
    assert all(word in r.reason for r in rejects), rejects
    _check_accounting(conv, path, items)


@pytest.mark.parametrize("name", ["truncated.sdf", "nan_coords.xyz", "flat_2d.sdf", "disordered.cif",
                                  "nan_frame.zarr"])
def test_record_ranges_are_accounted(name: str, corpus: Path) -> None:
    path = corpus / name
    conv = converter_for(path)()
    items = _run(conv, path, records=range(0, 4))
    assert sorted(r.record if isinstance(r, Reject) else r.index for r in items) == [0, 1, 2, 3]


def test_missing_file_and_directory_are_one_reject(tmp_path: Path) -> None:
    for conv_name, path in (("sdf", tmp_path / "missing.sdf"), ("pdb", tmp_path / "dir.pdb")):
        if conv_name == "pdb":
            path.mkdir()
        conv = get_converter(conv_name)()
        (rej,) = _run(conv, path)
        assert rej.record is None and rej.reason and rej.converter == conv_name


def test_wrong_suffix_read_by_the_right_converter() -> None:
    (g,) = _run(get_converter("sdf")(), BROKEN / "wrong_suffix.pdb")
    assert isinstance(g, AtomGraph) and g.n_atoms > 0


def test_trajectory_with_mismatched_topology() -> None:
    import MDAnalysisTests.datafiles as d

    conv = get_converter("mdanalysis")()
    (rej,) = _run(conv, Path(d.NCDF), {"topology": d.PSF})
    assert rej.record is None and "n_atoms" in rej.reason and rej.converter == "mdanalysis"
    items = _run(conv, Path(d.NCDF), {"topology": d.PSF}, records=range(0, 3))
    assert len(items) == 1 and items[0].record is None


def test_size_bounds_are_rejects() -> None:
    import MDAnalysisTests.datafiles as d

    path = Path(d.PDB_multiframe)
    conv = get_converter("pdb")()
    opts = conv.parse_options({"models": "all"})
    (big,) = list(safe_convert(conv, path, opts, source="b", file_id=path.name, max_file_bytes=1000))
    assert big.record is None and "limit" in big.reason
    items = list(safe_convert(conv, path, opts, source="b", file_id=path.name, records=range(0, 3), max_atoms=10))
    assert [r.record for r in items] == [0, 1, 2] and all("atoms exceed" in r.reason for r in items)


def test_safe_convert_keeps_each_wanted_record_once_in_any_order(tmp_path: Path) -> None:
    """A converter that repeats records, goes back, strays outside the range and yields oversized samples: each
    wanted record comes out once (its first occurrence), in the converter's order, and the rest of the range are
    rejects; the fast path for rising indices and the general path agree."""
    import numpy as np

    from ingest.plugin import Converter
    from shards.format.schema import NO_PBC, ZERO_CELL, make_key

    order = [2, 3, 3, 1, 9, 2, 4, 0, 6, 5, 5]

    class Wobbly(Converter):
        name, domain, suffixes = "wobbly", "molecule", (".wob",)

        def convert(self, path, options, *, source, file_id, records=None):
            for i in order:
                n = 5 if i == 4 else 2
                yield AtomGraph(key=make_key(source, file_id, i), domain="molecule", source=source,
                                source_file=file_id, index=i, atomic_numbers=np.ones(n, dtype=np.uint8),
                                positions=np.arange(3 * n, dtype=np.float32).reshape(n, 3), cell=ZERO_CELL, pbc=NO_PBC)

    path = tmp_path / "x.wob"
    path.write_text("x")
    conv = Wobbly()
    items = list(safe_convert(conv, path, conv.parse_options({}), source="s", file_id="x.wob", records=range(1, 8),
                              max_atoms=4))
    got = [(type(x).__name__, x.index if isinstance(x, AtomGraph) else x.record) for x in items]
    assert got == [("AtomGraph", 2), ("AtomGraph", 3), ("AtomGraph", 1), ("Reject", 4), ("AtomGraph", 6),
                   ("AtomGraph", 5), ("Reject", 7)]
    every = list(safe_convert(conv, path, conv.parse_options({}), source="s", file_id="x.wob"))
    assert [x.index for x in every] == [2, 3, 1, 9, 4, 0, 6, 5]
