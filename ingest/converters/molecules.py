"""Molecule converters: SDF/MOL (RDKit), SMILES files (RDKit ETKDG + force field), XYZ/extended XYZ (ASE)."""
from __future__ import annotations

import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ingest.plugin import Converter, Reject, owned
from shards.schema import NO_PBC, ZERO_CELL, AtomGraph, make_key


def open_maybe_gz(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def graph_from_rdkit(mol: Any, *, key: str, source: str, source_file: str, index: int,
                     conf_id: int = -1, domain: str = "molecule") -> AtomGraph:
    """An AtomGraph from an RDKit molecule with a conformer (explicit hydrogens kept as given)."""
    from rdkit import Chem

    conf = mol.GetConformer(conf_id)
    n = mol.GetNumAtoms()
    z = owned(np.fromiter((mol.GetAtomWithIdx(i).GetAtomicNum() for i in range(n)), dtype=np.uint8, count=n),
              np.uint8)
    order = Chem.GetAdjacencyMatrix(mol, useBO=True)  # C++; bond orders, aromatic = 1.5
    i, j = np.nonzero(order)
    upper = i < j
    i, j = i[upper], j[upper]
    bonds = np.empty((i.shape[0], 2), dtype=np.int32)
    bonds[:, 0], bonds[:, 1] = i, j
    bonds.flags.writeable = False
    return AtomGraph(
        key=key, domain=domain, source=source, source_file=source_file, index=index, atomic_numbers=z,
        positions=owned(conf.GetPositions(), np.float32), cell=ZERO_CELL, pbc=NO_PBC,
        charge=int(Chem.GetFormalCharge(mol)), bonds=bonds, bond_order=owned(order[i, j], np.float32))


@dataclass(frozen=True)
class SDFOptions:
    """``embed_2d``: give 2D records 3D coordinates (ETKDG, seeded) instead of rejecting them."""

    embed_2d: bool = False
    seed: int = 0
    sanitize: bool = True


class SDFConverter(Converter):
    """SDF / MOL files, gzipped or not; explicit hydrogens kept, formal charges -> total charge, bonds and
    orders kept. A record is 2D when RDKit finds no 3D conformer (header ``2D`` and all z = 0)."""

    name = "sdf"
    domain = "molecule"
    suffixes = (".sdf", ".sdf.gz", ".mol", ".mol.gz", ".sd")
    default_source = "sdf"
    Options = SDFOptions

    def count_records(self, path: Path, options: Any) -> int | None:
        n, tail = 0, False
        with open_maybe_gz(path) as fh:
            for line in fh:
                if line.startswith(b"$$$$"):
                    n, tail = n + 1, False
                elif line.strip():
                    tail = True
        return n + tail

    def convert(self, path: Path, options: SDFOptions, *, source: str, file_id: str,
                records: range | None = None) -> Iterator[AtomGraph | Reject]:
        from rdkit import Chem, RDLogger

        RDLogger.DisableLog("rdApp.*")
        i = -1
        with open_maybe_gz(path) as fh:
            supplier = Chem.ForwardSDMolSupplier(fh, removeHs=False, sanitize=options.sanitize)
            for i, mol in enumerate(supplier):
                if records is not None:
                    if i < records.start:
                        continue
                    if i >= records.stop:
                        break
                if mol is None:
                    yield self.reject(file_id, i, "RDKit could not parse the record")
                    continue
                if mol.GetNumAtoms() == 0:
                    yield self.reject(file_id, i, "zero atoms")
                    continue
                if mol.GetNumConformers() == 0 or not mol.GetConformer().Is3D():
                    if not options.embed_2d:
                        yield self.reject(file_id, i, "2D record (all z = 0); set embed_2d: true to embed it")
                        continue
                    mol = _embed(Chem.AddHs(mol, addCoords=True), options.seed)
                    if mol is None:
                        yield self.reject(file_id, i, "ETKDG embedding of the 2D record failed")
                        continue
                yield self.build(file_id, i, lambda m=mol, i=i: graph_from_rdkit(
                    m, key=make_key(source, file_id, i), source=source, source_file=file_id, index=i))
            if records is not None and i + 1 < records.stop:
                for j in range(max(i + 1, records.start), records.stop):
                    yield self.reject(file_id, j, "record beyond the end of the file")


def _embed(mol: Any, seed: int, n_confs: int = 1) -> Any:
    from rdkit.Chem import AllChem

    params = AllChem.ETKDGv3()
    params.randomSeed = int(seed)
    ids = AllChem.EmbedMultipleConfs(mol, numConfs=n_confs, params=params)
    if len(ids) < n_confs:
        return None
    if AllChem.MMFFHasAllMoleculeParams(mol):
        AllChem.MMFFOptimizeMoleculeConfs(mol, maxIters=500)
    else:
        AllChem.UFFOptimizeMoleculeConfs(mol, maxIters=500)
    return mol


@dataclass(frozen=True)
class SmilesOptions:
    """3D by ETKDG + MMFF (UFF fallback); ``conformers`` per molecule, seeded."""

    conformers: int = 1
    seed: int = 0
    delimiter: str | None = None


class SmilesConverter(Converter):
    """SMILES files (one molecule per line, optional name after whitespace). Record = (line, conformer)."""

    name = "smiles"
    domain = "molecule"
    suffixes = (".smi", ".smiles", ".smi.gz")
    default_source = "smiles"
    Options = SmilesOptions

    def count_records(self, path: Path, options: SmilesOptions) -> int | None:
        with open_maybe_gz(path) as fh:
            return sum(1 for line in fh if line.strip()) * options.conformers

    def convert(self, path: Path, options: SmilesOptions, *, source: str, file_id: str,
                records: range | None = None) -> Iterator[AtomGraph | Reject]:
        from rdkit import Chem, RDLogger

        RDLogger.DisableLog("rdApp.*")
        k = options.conformers
        with open_maybe_gz(path) as fh:
            lines = (line.decode(errors="replace").strip() for line in fh)
            for line_no, line in enumerate(x for x in lines if x):
                rec0 = line_no * k
                wanted = [r for r in range(rec0, rec0 + k) if records is None or r in records]
                if not wanted:
                    if records is not None and rec0 >= records.stop:
                        break
                    continue
                smi = line.split(options.delimiter)[0]
                mol = Chem.MolFromSmiles(smi)
                if mol is None:
                    yield from (self.reject(file_id, r, f"invalid SMILES {smi[:60]!r}") for r in wanted)
                    continue
                mol = _embed(Chem.AddHs(mol), options.seed + line_no, k)
                if mol is None:
                    yield from (self.reject(file_id, r, "ETKDG embedding failed") for r in wanted)
                    continue
                for r in wanted:
                    yield self.build(file_id, r, lambda r=r: graph_from_rdkit(
                        mol, key=make_key(source, file_id, r), source=source, source_file=file_id, index=r,
                        conf_id=r - rec0))


@dataclass(frozen=True)
class XYZOptions:
    """Domain of the frames (``molecule``; use ``md`` for trajectories written as multi-frame XYZ)."""

    domain: str = "molecule"


class XYZConverter(Converter):
    """XYZ / extended XYZ (ASE), multi-frame; energies, forces and lattices carried when present."""

    name = "xyz"
    domain = "molecule"
    suffixes = (".xyz", ".extxyz", ".xyz.gz", ".extxyz.gz")
    default_source = "xyz"
    Options = XYZOptions

    def count_records(self, path: Path, options: XYZOptions) -> int | None:
        return xyz_frame_count(path)

    def convert(self, path: Path, options: XYZOptions, *, source: str, file_id: str,
                records: range | None = None) -> Iterator[AtomGraph | Reject]:
        import ase.io

        frames = slice(None) if records is None else slice(records.start, records.stop)
        start = 0 if records is None else records.start
        for i, atoms in enumerate(ase.io.iread(str(path), index=frames, format="extxyz"), start):
            yield self.build(file_id, i, lambda a=atoms, i=i: AtomGraph.from_ase(
                a, key=make_key(source, file_id, i), domain=options.domain, source=source, source_file=file_id,
                index=i))


def xyz_frame_count(path: Path) -> int:
    """Frames of a (extended) XYZ file, gzipped or not, from the atom-count lines alone."""
    n = 0
    with open_maybe_gz(path) as fh:
        while line := fh.readline():
            if not line.strip():
                continue
            for _ in range(int(line) + 1):
                if not fh.readline():
                    raise ValueError(f"frame {n} of {path.name} is truncated")
            n += 1
    return n
