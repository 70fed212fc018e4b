"""Parquet converter: one structure per row, columns mapped by the options (pyarrow).

Files come from :mod:`tests.containerfiles`."""
from __future__ import annotations

import numpy as np
import pytest

from ingest.registry import converter_for
from tests.containerfiles import (
    KCAL,
    PARQUET_OPTIONS,
    count_records,
    same_graphs,
    write_parquet,
)
from tests.convhelp import convert


def test_parquet_column_mapping_units_and_rejects(tmp_path) -> None:
    path = write_parquet(tmp_path / "hub.parquet")
    assert converter_for(path).name == "parquet" and count_records("parquet", path) == 10
    graphs, rejects = convert("parquet", path, PARQUET_OPTIONS)
    assert [g.index for g in graphs] == [0, 1, 2, 3, 7, 8, 9]
    reasons = {r.record: r.reason for r in rejects}
    assert "inner lists are not of length 3" in reasons[4]
    assert "unknown element" in reasons[5] and "null" in reasons[6]
    g1 = graphs[1]
    assert g1.atomic_numbers.tolist() == [6, 1, 1]
    np.testing.assert_allclose(g1.positions, [[0.1, 0, 1], [1.1, 0.5, 1], [2.1, 1.0, 1]], atol=1e-6)
    assert g1.energy == pytest.approx(-99.0 * KCAL, rel=1e-9)
    np.testing.assert_allclose(g1.forces, [[0.108410260604, 0, -0.108410260604]] * 3, rtol=1e-6)
    assert (g1.charge, g1.spin) == (1, 1) and g1.properties == {"gap": 1.5} and g1.property_units == {"gap": "eV"}
    assert g1.domain == "molecule" and graphs[-1].domain == "crystal" and graphs[-1].pbc.all()
    np.testing.assert_allclose(graphs[-1].cell, np.eye(3) * 5.0)
    flat = dict(PARQUET_OPTIONS, columns=dict(PARQUET_OPTIONS["columns"], positions="pos_flat"))
    flat_graphs, _ = convert("parquet", path, flat)
    assert np.array_equal(flat_graphs[1].positions, g1.positions)
    by_symbol = dict(PARQUET_OPTIONS, columns=dict(PARQUET_OPTIONS["columns"], atomic_numbers="symbols"))
    symbol_graphs, _ = convert("parquet", path, by_symbol)
    assert symbol_graphs[1].atomic_numbers.tolist() == [6, 1, 1] and len(symbol_graphs) == 8  # row 5 is fine here


def test_parquet_ranges_across_row_groups_and_missing_columns(tmp_path) -> None:
    path = write_parquet(tmp_path / "hub.parquet")
    whole, _ = convert("parquet", path, PARQUET_OPTIONS)
    parts = []
    for rng in (range(0, 3), range(3, 7), range(7, 10)):  # cuts inside the row groups of 4
        g, rej = convert("parquet", path, PARQUET_OPTIONS, records=rng)
        assert sorted([x.index for x in g] + [r.record for r in rej]) == list(rng)
        parts += g
    assert same_graphs(parts, whole)
    _, beyond = convert("parquet", path, PARQUET_OPTIONS, records=range(9, 11))
    assert [(r.record, r.reason) for r in beyond] == [(10, "row beyond the end of the table")]
    wrong = dict(PARQUET_OPTIONS, columns={"atomic_numbers": "Z", "positions": "pos"})
    graphs, rejects = convert("parquet", path, wrong)
    assert not graphs and len(rejects) == 1 and rejects[0].record is None and "'Z'" in rejects[0].reason
