"""Molecule converters: SDF/MOL (RDKit), SMILES files (RDKit ETKDG + force field), XYZ/extended XYZ (ASE)."""
from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from ingest.plugin import Converter, InputBounds, Reject, open_input, owned
from shards.format.schema import MAX_ATOMS_DEFAULT, NO_PBC, ZERO_CELL, AtomGraph, make_key


def open_maybe_gz(path: Path, bounds: InputBounds | None = None) -> IO[bytes]:
    """The file's bytes, decompressed when it ends in .gz, within ``bounds`` (defaults when None)."""
    return open_input(path, bounds)


def graph_from_rdkit(mol: Any, *, key: str, source: str, source_file: str, index: int,
                     conf_id: int = -1, domain: str = "molecule") -> AtomGraph:
    """An AtomGraph from an RDKit molecule with a conformer (explicit hydrogens kept as given)."""
    from rdkit import Chem

    conf = mol.GetConformer(conf_id)
    n = mol.GetNumAtoms()
    # map() keeps the per-atom loop in C: a third less than a generator over the same RDKit calls
    z = owned(np.array(list(map(Chem.Atom.GetAtomicNum, map(mol.GetAtomWithIdx, range(n)))), dtype=np.uint8),
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
class SDFOptions(InputBounds):
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
        with open_maybe_gz(path, options) as fh:
            for line in fh:
                if line.startswith(b"$$$$"):
                    n, tail = n + 1, False
                elif line.strip():
                    tail = True
        return n + tail

    def convert(self, path: Path, options: SDFOptions, *, source: str, file_id: str,
                records: range | None = None) -> Iterator[AtomGraph | Reject]:
        from rdkit import Chem, rdBase

        rdBase.DisableLog("rdApp.*")
        i = -1
        with open_maybe_gz(path, options) as fh:
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
    from rdkit.Chem import rdDistGeom, rdForceFieldHelpers

    params: Any = rdDistGeom.ETKDGv3()  # the stubs type randomSeed as EmbedParameters
    params.randomSeed = int(seed)
    ids = rdDistGeom.EmbedMultipleConfs(mol, numConfs=n_confs, params=params)
    if len(ids) < n_confs:
        return None
    if rdForceFieldHelpers.MMFFHasAllMoleculeParams(mol):
        rdForceFieldHelpers.MMFFOptimizeMoleculeConfs(mol, maxIters=500)
    else:
        rdForceFieldHelpers.UFFOptimizeMoleculeConfs(mol, maxIters=500)
    return mol


@dataclass(frozen=True)
class SmilesOptions(InputBounds):
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
        with open_maybe_gz(path, options) as fh:
            return sum(1 for line in fh if line.strip()) * options.conformers

    def convert(self, path: Path, options: SmilesOptions, *, source: str, file_id: str,
                records: range | None = None) -> Iterator[AtomGraph | Reject]:
        from rdkit import Chem, rdBase

        rdBase.DisableLog("rdApp.*")
        k = options.conformers
        with open_maybe_gz(path, options) as fh:
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
                    yield self.build(file_id, r, lambda r=r, mol=mol, rec0=rec0: graph_from_rdkit(
                        mol, key=make_key(source, file_id, r), source=source, source_file=file_id, index=r,
                        conf_id=r - rec0))


@dataclass(frozen=True)
class XYZOptions(InputBounds):
    """Domain of the frames (``molecule``; use ``md`` for trajectories written as multi-frame XYZ)."""

    domain: str = "molecule"


class XYZConverter(Converter):
    """XYZ / extended XYZ (ASE), multi-frame; energies, forces and lattices carried when present. A record is a
    frame, or a stretch of lines that is no well-formed frame (a wrong atom-count line, garbage): that stretch is
    one reject with its record index and the frames around it are still samples. Undecodable bytes in a comment
    line are replaced; in an atom line they reject the frame."""

    name = "xyz"
    domain = "molecule"
    suffixes = (".xyz", ".extxyz", ".xyz.gz", ".extxyz.gz")
    default_source = "xyz"
    Options = XYZOptions

    def count_records(self, path: Path, options: XYZOptions) -> int | None:
        return xyz_frame_count(path, options)

    def convert(self, path: Path, options: XYZOptions, *, source: str, file_id: str,
                records: range | None = None) -> Iterator[AtomGraph | Reject]:
        i, pending = -1, None
        with open_maybe_gz(path, options) as fh:
            for i, (lines, why) in enumerate(xyz_records(fh)):
                if pending is not None:
                    yield pending
                    pending = None
                if records is not None and i >= records.stop:
                    return
                if records is not None and i not in records:
                    continue
                if lines is None:
                    pending = self.reject(file_id, i, why)  # held back: the whole file may be no XYZ at all
                    continue
                yield self.build(file_id, i, lambda lines=lines, i=i: AtomGraph.from_ase(
                    xyz_frame_atoms(lines), key=make_key(source, file_id, i), domain=options.domain, source=source,
                    source_file=file_id, index=i))
        if i == -1 and records is None:
            yield self.reject(file_id, None, "no XYZ frame in the file (empty)")
        elif pending is not None:
            yield self.reject(file_id, None, f"no XYZ frame in the file: {pending.reason}") if i == 0 else pending


def xyz_frame_atoms(lines: list[bytes]) -> Any:
    """ASE Atoms of one well-formed frame from :func:`xyz_records` (extended XYZ properties and labels kept)."""
    from ase.io.extxyz import read_xyz

    return next(read_xyz(io.StringIO(_frame_text(lines)), 0))


def _frame_text(lines: list[bytes]) -> str:
    """A frame's text: the comment line decoded leniently, count and atom lines strictly (UTF-8)."""
    try:
        atoms = b"".join(lines[2:]).decode()
    except UnicodeDecodeError as exc:
        raise ValueError(f"undecodable bytes in an atom line: {exc.reason}") from None
    return lines[0].decode() + lines[1].decode(errors="replace") + atoms


def _count_line(line: bytes) -> int | None:
    parts = line.split()
    if len(parts) != 1 or not parts[0].isdigit():
        return None
    return int(parts[0])


def _is_atom_line(line: bytes) -> bool:
    return len(line.split(maxsplit=4)) >= 4


def _fill(buf: list[bytes], fh: IO[bytes], k: int) -> bool:
    """Read lines into ``buf`` until it holds ``k``; False at the end of the file."""
    while len(buf) < k:
        line = fh.readline()
        if not line:
            return False
        buf.append(line)
    return True


def _frame_at(buf: list[bytes], fh: IO[bytes], j: int) -> tuple[int, str]:
    """(lines, "") of the well-formed frame that starts at ``buf[j]``, or (0, why not)."""
    n = _count_line(buf[j])
    if n is None:
        return 0, f"not an atom-count line: {buf[j][:40].decode(errors='replace').strip()!r}"
    if n > MAX_ATOMS_DEFAULT:  # also bounds the lines held in memory
        return 0, f"the atom-count line says {n} atoms, more than a sample may hold ({MAX_ATOMS_DEFAULT})"
    if not _fill(buf, fh, j + 2):
        return 0, f"truncated frame: {n} atoms announced, no comment line"
    for a in range(n):
        if not _fill(buf, fh, j + 3 + a):
            return 0, f"truncated frame: {n} atoms announced, {a} atom lines follow"
        if not _is_atom_line(buf[j + 2 + a]):
            return 0, f"the atom-count line says {n} atoms but {a} atom lines follow"
    end = j + n + 2
    while end - (j + n + 2) < 3 and _fill(buf, fh, end + 1) and buf[end].lstrip().startswith(b"VEC"):
        end += 1  # legacy extended-XYZ lattice vectors (VEC1..VEC3) belong to the frame
    if _fill(buf, fh, end + 1) and _is_atom_line(buf[end]):
        return 0, f"the atom-count line says {n} atoms but more atom lines follow"
    return end - j, ""


def xyz_records(fh: IO[bytes]) -> Iterator[tuple[list[bytes] | None, str]]:
    """Split an (extended) XYZ byte stream into records, one frame in memory at a time: ``(lines, "")`` for a
    well-formed frame (count line, comment line, as many lines of >= 4 fields as announced, not followed by
    another such line), ``(None, why)`` for the stretch of lines up to the next well-formed frame."""
    buf: list[bytes] = []
    while True:
        while _fill(buf, fh, 1) and not buf[0].strip():
            del buf[0]
        if not buf:
            return
        length, why = _frame_at(buf, fh, 0)
        if length:
            yield buf[:length], ""
            del buf[:length]
            continue
        j = 1
        while _fill(buf, fh, j + 1) and not (_count_line(buf[j]) is not None and _frame_at(buf, fh, j)[0]):
            j += 1
        yield None, why
        del buf[:j]


def xyz_frame_count(path: Path, bounds: InputBounds | None = None) -> int:
    """Records of a (extended) XYZ file, gzipped or not: frames and the stretches between them that are none."""
    with open_maybe_gz(path, bounds) as fh:
        return sum(1 for _ in xyz_records(fh))
