"""ASE database converter: SQLite ``.db`` and ``.aselmdb`` rows (ase, ase-db-backends).

Files come from :mod:`tests.containerfiles`."""
from __future__ import annotations

import os
import pickle
import zlib

import numpy as np
import pytest

from ingest.registry import converter_for, get_converter
from tests.containerfiles import (
    Boom,
    count_records,
    same_graphs,
    write_db,
)
from tests.convhelp import convert


@pytest.mark.parametrize("backend,suffix", [("db", ".db"), ("aselmdb", ".aselmdb")])
def test_ase_db_rows_with_results_charge_spin(tmp_path, backend, suffix) -> None:
    path = tmp_path / f"omat{suffix}"
    rows = write_db(path, backend)
    mtime = os.stat(path).st_mtime_ns
    assert converter_for(path).name == "ase_db" and count_records("ase_db", path) == 3
    graphs, rejects = convert("ase_db", path, {"properties": {"sid": "-"}})
    assert not rejects and [g.index for g in graphs] == [0, 1, 2]
    assert len({g.key for g in graphs}) == 3 and "sid" not in {g.key for g in graphs}  # keys are not option names
    cu, water, oh = graphs
    assert cu.domain == "crystal" and cu.pbc.all() and water.domain == "molecule" and not water.pbc.any()
    np.testing.assert_allclose(cu.cell, np.eye(3) * 3.6)
    np.testing.assert_allclose(cu.positions, rows[0].positions, atol=1e-6)
    np.testing.assert_allclose(water.positions, rows[1].positions, atol=1e-6)
    assert cu.energy == -14.5 and np.allclose(cu.forces, 0.125)
    assert cu.properties == {"stress_xx": 0.01, "stress_yy": 0.02, "stress_zz": 0.03, "stress_yz": 0.04,
                             "stress_xz": 0.05, "stress_xy": 0.06, "sid": 7.0}
    assert cu.property_units["stress_xy"] == "eV/Å^3" and cu.property_units["sid"] == "-"
    assert (water.charge, water.spin) == (0, 1) and (oh.charge, oh.spin) == (-1, 1)
    assert oh.energy is None and oh.forces is None and cu.charge is None
    assert os.stat(path).st_mtime_ns == mtime  # read-only: the fingerprint of a unit stays valid
    a, _ = convert("ase_db", path, records=range(0, 1))
    b, rb = convert("ase_db", path, records=range(1, 4))
    assert same_graphs(a + b, convert("ase_db", path)[0])
    assert [(r.record, r.reason) for r in rb] == [(3, "row beyond the end of the database")]


@pytest.mark.parametrize("backend,suffix", [("db", ".db"), ("aselmdb", ".aselmdb")])
def test_ase_db_bad_rows(tmp_path, backend, suffix) -> None:
    import ase.db
    from ase import Atoms

    path = tmp_path / f"bad{suffix}"
    db = ase.db.connect(str(path), type=backend)
    db.write(Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]]))
    db.write(Atoms("H2", positions=[[0, 0, 0], [0, 0, np.nan]]))
    db.write(Atoms("XH", positions=[[0, 0, 0], [0, 0, 1.0]]))  # Z = 0: ASE's dummy atom
    db.write(Atoms())
    if hasattr(db, "close"):
        db.close()
    graphs, rejects = convert("ase_db", path)
    assert [g.index for g in graphs] == [0]
    reasons = {r.record: r.reason for r in rejects}
    assert "NaN" in reasons[1] and "unknown element" in reasons[2] and "zero atoms" in reasons[3]


def test_ase_db_refuses_pickled_lmdb_and_foreign_sqlite(tmp_path) -> None:
    import sqlite3

    import lmdb

    marker = tmp_path / "unpickled"
    Boom.marker = str(marker)
    legacy = tmp_path / "data.lmdb"  # the legacy OC20 layout: pickled objects under ascii integer keys
    env = lmdb.open(str(legacy), subdir=False, map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"0", pickle.dumps(Boom(), protocol=4))
        txn.put(b"length", pickle.dumps(1, protocol=4))
    env.close()
    assert converter_for(legacy).name == "ase_db"
    graphs, rejects = convert("ase_db", legacy)
    assert not graphs and len(rejects) == 1 and rejects[0].record is None
    reason = rejects[0].reason
    assert "pickled" in reason and "never unpickled" in reason and "data.lmdb" in reason
    assert not marker.exists()
    compressed = tmp_path / "zpickle.aselmdb"
    env = lmdb.open(str(compressed), subdir=False, map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"1", zlib.compress(pickle.dumps(Boom(), protocol=4)))
    env.close()
    _, rejects = convert("ase_db", compressed)
    assert len(rejects) == 1 and "pickle" in rejects[0].reason and not marker.exists()
    foreign = tmp_path / "app.db"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE t (x INTEGER)")
    con.commit()
    con.close()
    before = foreign.read_bytes()
    _, rejects = convert("ase_db", foreign)
    assert len(rejects) == 1 and "systems table" in rejects[0].reason
    assert foreign.read_bytes() == before  # ase.db would have created its tables in it
    text = tmp_path / "notes.db"
    text.write_text("hello")
    assert not get_converter("ase_db")().can_convert(text)


def test_aselmdb_rows_that_cannot_be_inflated_are_rejects_of_their_own(tmp_path, monkeypatch) -> None:
    """A truncated entry and one that inflates past the per-row bound are one reject each (the bomb is never
    inflated whole); the rows around them still become samples."""
    import ase.db
    import lmdb
    from ase import Atoms

    from ingest.converters import asedb

    path = tmp_path / "broken.aselmdb"
    db = ase.db.connect(str(path), type="aselmdb")
    for k in range(8):
        db.write(Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.7 + 0.01 * k]]))
    db.close()
    env = lmdb.open(str(path), subdir=False, map_size=1 << 24)
    with env.begin(write=True) as txn:
        whole = txn.get(b"6")  # ids count from 1; the first rows stay intact for the format probe
        txn.put(b"6", whole[: len(whole) // 2])
        txn.put(b"7", zlib.compress(b"{" + b" " * 4_000_000 + b"}"))
    env.close()
    monkeypatch.setattr(asedb, "MAX_ROW_BYTES", 100_000)
    graphs, rejects = convert("ase_db", path)
    assert [g.index for g in graphs] == [0, 1, 2, 3, 4, 7], rejects
    np.testing.assert_allclose(graphs[-1].positions[1], [0, 0, 0.77], atol=1e-6)
    reasons = {r.record: r.reason for r in rejects}
    assert sorted(reasons) == [5, 6]
    assert "truncated" in reasons[5] and "more than 100000 bytes" in reasons[6]
