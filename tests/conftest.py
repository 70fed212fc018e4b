"""Shared fixtures: real structures from the data kit (packages installed with the project)."""
from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest

from shards.schema import AtomGraph, make_key


@functools.lru_cache(maxsize=1)
def _real_graphs() -> tuple[AtomGraph, ...]:
    from ase.collections import g2
    from MDAnalysisTests.datafiles import PDB_small as ADK_PDB  # adk_open.pdb
    from pymatgen.core import Structure

    out = []
    for i, atoms in enumerate(g2):
        out.append(AtomGraph.from_ase(atoms, key=make_key("g2", "ase.collections.g2", i), domain="molecule",
                                      source="g2", source_file="ase.collections.g2", index=i))
    import pymatgen.util as pu

    sdir = Path(pu.__file__).parent / "structures"
    for path in sorted(sdir.glob("*.json")):
        s = Structure.from_file(path)
        if s.is_ordered:
            out.append(AtomGraph.from_pymatgen(s, key=make_key("pmg", path.name, 0), domain="crystal",
                                               source="pymatgen", source_file=path.name, index=0))
    out.append(_adk_protein(ADK_PDB))
    return tuple(out)


def _element(atom) -> str:
    el = atom.element.capitalize()
    return el if el not in ("", "X") else atom.get_name().lstrip("0123456789")[0]


def _adk_protein(path: str) -> AtomGraph:
    from ase.data import atomic_numbers
    from Bio.PDB import PDBParser

    atoms = list(PDBParser(QUIET=True).get_structure("adk", path)[0].get_atoms())
    res = [a.get_parent() for a in atoms]
    return AtomGraph(
        key=make_key("adk", "adk_open.pdb", 0), domain="protein", source="adk", source_file="adk_open.pdb",
        index=0, atomic_numbers=[atomic_numbers[_element(a)] for a in atoms],
        positions=np.array([a.coord for a in atoms]), cell=np.zeros((3, 3)), pbc=np.zeros(3, bool),
        atom_name=[a.get_name()[:4] for a in atoms], residue_index=[r.id[1] for r in res],
        residue_name=[r.get_resname()[:4] for r in res], chain=[r.get_parent().id for r in res],
        hetero=[r.id[0] != " " for r in res])


@pytest.fixture(scope="session")
def real_graphs() -> tuple[AtomGraph, ...]:
    """~180 real structures: ASE g2 molecules, pymatgen's ordered crystals, the adk protein (3,341 atoms)."""
    return _real_graphs()


@pytest.fixture()
def http_root(tmp_path: Path):
    """Serve ``tmp_path`` over http on 127.0.0.1; yields (base_url, folder)."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(tmp_path), **k)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", tmp_path
    finally:
        server.shutdown()
        server.server_close()
