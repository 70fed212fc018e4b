"""Schema: validation names field and sample; interop round trips; version refusal; README table."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest

from shards.format.schema import FIELDS, AtomGraph, SchemaError, SchemaVersionError, check_schema_version


def _base(**kw):
    args = dict(key="mol-1", domain="molecule", source="test", source_file="x.sdf", index=0,
                atomic_numbers=[6, 1], positions=[[0, 0, 0], [1.09, 0, 0]], cell=np.zeros((3, 3)),
                pbc=[False, False, False])
    args.update(kw)
    return AtomGraph(**args)


@pytest.mark.parametrize("changes, field", [
    (dict(positions=[[0, 0, np.nan], [1, 0, 0]]), "positions"),
    (dict(positions=[[0, 0, np.inf], [1, 0, 0]]), "positions"),
    (dict(atomic_numbers=[0, 1]), "atomic_numbers"),
    (dict(atomic_numbers=[6, 119]), "atomic_numbers"),
    (dict(atomic_numbers=[6, 1, 1]), "positions"),
    (dict(atomic_numbers=[], positions=np.zeros((0, 3))), "atomic_numbers"),
    (dict(pbc=[True, False, False]), "cell"),
    (dict(forces=np.zeros((3, 3))), "forces"),
    (dict(bonds=[[0, 5]], bond_order=[1.0]), "bonds"),
    (dict(key="has.dot"), "key"),
    (dict(key="../escape"), "key"),
    (dict(domain="Not A Domain"), "domain"),
    (dict(energy=float("nan")), "energy"),
    (dict(property_units={"homo": "eV"}), "property_units"),
])
def test_bad_records_name_field_and_sample(changes, field):
    with pytest.raises(SchemaError) as err:
        _base(**changes)
    assert err.value.field == field
    assert repr(changes.get("key", "mol-1")) in str(err.value) and field in str(err.value)


def test_arrays_are_canonical_and_read_only():
    pos = np.array([[0, 0, 0], [1.0, 0, 0]])
    g = _base(positions=pos)
    assert g.positions.dtype == np.float32 and g.atomic_numbers.dtype == np.uint8
    pos[0, 0] = 99.0
    assert g.positions[0, 0] == 0.0
    with pytest.raises(ValueError):
        g.positions[0, 0] = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.key = "other"


def test_ase_round_trip(real_graphs):
    for g in real_graphs:
        back = AtomGraph.from_ase(g.to_ase(), key=g.key, domain=g.domain, source=g.source,
                                  source_file=g.source_file, index=g.index)
        np.testing.assert_array_equal(back.atomic_numbers, g.atomic_numbers)
        np.testing.assert_array_equal(back.positions, g.positions)
        np.testing.assert_array_equal(back.cell, g.cell)
        np.testing.assert_array_equal(back.pbc, g.pbc)


def test_pymatgen_round_trip(real_graphs):
    for g in real_graphs[:20] + tuple(x for x in real_graphs if x.domain == "crystal"):
        obj = g.to_pymatgen()
        back = AtomGraph.from_pymatgen(obj, key=g.key, domain=g.domain, source=g.source)
        np.testing.assert_array_equal(back.atomic_numbers, g.atomic_numbers)
        np.testing.assert_allclose(back.positions, g.positions, atol=1e-5)
        np.testing.assert_allclose(back.cell, g.cell, atol=1e-12)


def test_disordered_pymatgen_structure_rejected():
    from pymatgen.core import Lattice, Structure

    s = Structure(Lattice.cubic(3.0), [{"Fe": 0.5, "Ni": 0.5}], [[0, 0, 0]])
    with pytest.raises(SchemaError, match="disordered"):
        AtomGraph.from_pymatgen(s, key="d-1", domain="crystal", source="t")


def test_unknown_major_version_refused():
    assert check_schema_version("1.7", "here") == (1, 7)
    with pytest.raises(SchemaVersionError, match="here: schema version 2.0 is not supported"):
        check_schema_version("2.0", "here")


def test_readme_field_table_matches_schema():
    from shards.tools.doc import field_table

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"<!-- schema-table:start -->\n(.*?)<!-- schema-table:end -->", readme, re.S)
    assert block, "README has no generated schema table"
    assert block.group(1) == field_table(), "README schema table is stale: run `python -m shards.tools.doc --write`"
    assert all(f"`{f.name}`" in block.group(1) for f in FIELDS)
