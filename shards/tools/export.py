"""Export one sample to a standard structure file (extxyz, cif, pdb) that ASE and pymatgen read."""
from __future__ import annotations

from pathlib import Path

from shards.format.reader import ShardDataset

# format -> (file suffix, ASE writer name)
EXPORT_FORMATS = {"extxyz": (".extxyz", "extxyz"), "cif": (".cif", "cif"), "pdb": (".pdb", "proteindatabank")}


def export_sample(dataset: str, key: str, fmt: str, out: Path | None = None) -> Path:
    """Write sample ``key`` of ``dataset`` as ``fmt``; returns the path written."""
    import ase.io

    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose from {sorted(EXPORT_FORMATS)}")
    g = ShardDataset(dataset).get(key)
    if fmt == "cif" and not g.pbc.all():
        raise ValueError(f"sample {key!r} is not periodic in all three axes; CIF needs a full cell "
                         "(use extxyz or pdb)")
    suffix, writer = EXPORT_FORMATS[fmt]
    out = Path(out) if out is not None else Path(f"{key}{suffix}")
    ase.io.write(str(out), g.to_ase(), format=writer)
    return out
