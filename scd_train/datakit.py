"""Locate the real structures that ship inside PyPI packages (the data kit) for demos and studies."""
from __future__ import annotations

import importlib.util
from pathlib import Path


def package_dir(name: str) -> Path:
    """The installed folder of a package, without importing it (qm9pack cannot be imported)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed; `make install` installs the data kit")
    return Path(list(spec.submodule_search_locations)[0])


def qm9_csv(part: int = 1) -> Path:
    return package_dir("qm9pack") / "data" / f"qm9_part{part}.csv"


def demo_sources() -> list[dict]:
    """A small real set from all four domains, as ingest job sources."""
    import MDAnalysisTests.datafiles as mda

    rdkit = package_dir("rdkit")
    pmg = package_dir("pymatgen")
    ase = package_dir("ase")
    mmcif = Path(mda.PDB_small).parent / "mmcif"
    return [
        {"source": "qm9", "converter": "qm9csv", "paths": [str(qm9_csv(1))], "max_records": 1500,
         "records_per_unit": 500},
        {"source": "egfr", "converter": "auto", "paths": [str(rdkit / "Contrib/PBF/testData/egfr.sdf")]},
        {"source": "pdb", "converter": "auto",
         "paths": [str(mmcif / "1YJP.cif"), str(mda.PDB_small), str(mda.PDB_multiframe)],
         "options": {}},
        {"source": "pymatgen", "converter": "auto", "paths": [str(pmg / "util/structures/*.json")]},
        {"source": "cod", "converter": "auto", "paths": [str(ase / "test/testdata/minerals/cod_*.cif")]},
        {"source": "adk-md", "converter": "auto", "paths": [mda.DCD],
         "options": {"topology": mda.PSF, "stride": 4}},
    ]
