"""Locate the real structures that ship inside PyPI packages (the data kit) for demos and studies.

The ingest sources here name files, not converters: ``converter: auto`` lets the converter registry
(the ``scd.converters`` entry points) choose each file's converter, in the ingest workers.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any


def package_dir(name: str) -> Path:
    """The installed folder of a package, without importing it (qm9pack cannot be imported)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed; `make install` installs the data kit")
    return Path(list(spec.submodule_search_locations)[0])


def qm9_csv(part: int = 1) -> Path:
    """One of the three QM9 CSVs of ``qm9pack``."""
    return package_dir("qm9pack") / "data" / f"qm9_part{part}.csv"


def qm9_source(part: int = 1, max_records: int | None = None, records_per_unit: int | None = None,
               source: str = "qm9") -> dict[str, Any]:
    """An ingest job source of the first ``max_records`` molecules of QM9 CSV ``part``."""
    spec: dict[str, Any] = {"source": source, "converter": "auto", "paths": [str(qm9_csv(part))]}
    if max_records is not None:
        spec["max_records"] = max_records
    if records_per_unit is not None:
        spec["records_per_unit"] = records_per_unit
    return spec


def demo_sources() -> list[dict[str, Any]]:
    """A small real set from all four domains, as ingest job sources."""
    import MDAnalysisTests.datafiles as mda

    rdkit = package_dir("rdkit")
    pmg = package_dir("pymatgen")
    ase = package_dir("ase")
    mmcif = Path(mda.PDB_small).parent / "mmcif"
    return [
        qm9_source(1, max_records=1500, records_per_unit=500),
        {"source": "egfr", "converter": "auto", "paths": [str(rdkit / "Contrib/PBF/testData/egfr.sdf")]},
        {"source": "pdb", "converter": "auto",
         "paths": [str(mmcif / "1YJP.cif"), str(mda.PDB_small), str(mda.PDB_multiframe)],
         "options": {}},
        {"source": "pymatgen", "converter": "auto", "paths": [str(pmg / "util/structures/*.json")]},
        {"source": "cod", "converter": "auto", "paths": [str(ase / "test/testdata/minerals/cod_*.cif")]},
        {"source": "adk-md", "converter": "auto", "paths": [mda.DCD],
         "options": {"topology": mda.PSF, "stride": 4}},
    ]
