"""The unified atom-graph schema: one table of fields and one frozen, self-validating record.

Everything else (codec, collation, README field table, manifest version) derives from ``FIELDS``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

SCHEMA_VERSION = (1, 0)
SCHEMA_VERSION_STR = f"{SCHEMA_VERSION[0]}.{SCHEMA_VERSION[1]}"
MAX_ATOMS_DEFAULT = 1_000_000
ZERO_CELL = np.zeros((3, 3), dtype=np.float64)
ZERO_CELL.flags.writeable = False
NO_PBC = np.zeros(3, dtype=bool)
NO_PBC.flags.writeable = False

KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,95}$")
NAME_RE = re.compile(r"^[a-z][a-z0-9_\-]{0,63}$")


class SchemaError(ValueError):
    """A record violates the schema; the message names the sample and the field."""

    def __init__(self, key: str, field: str, reason: str) -> None:
        super().__init__(f"sample {key!r}: field {field!r}: {reason}")
        self.key, self.field, self.reason = key, field, reason


@dataclass(frozen=True)
class Field:
    """One schema field. ``shape`` uses ``"N"`` (atoms) and ``"B"`` (bonds) as symbolic sizes."""

    name: str
    kind: str  # "array" | "str" | "int" | "float" | "map"
    dtype: str
    shape: tuple[Any, ...]
    level: str  # "atom" | "graph" | "bond"
    unit: str
    required: bool
    doc: str


FIELDS: tuple[Field, ...] = (
    Field("key", "str", "str", (), "graph", "", True, "stable sample key, unique in a dataset; [A-Za-z0-9_-], no dots"),
    Field("domain", "str", "str", (), "graph", "", True, "molecule, protein, crystal, md, or a plugin's domain"),
    Field("source", "str", "str", (), "graph", "", True, "source dataset name, e.g. qm9, pdb, cod"),
    Field("source_file", "str", "str", (), "graph", "", True, "provenance: input file the record came from"),
    Field("index", "int", "int64", (), "graph", "", True, "provenance: record / model / frame index in the file"),
    Field("atomic_numbers", "array", "uint8", ("N",), "atom", "", True, "atomic numbers Z in 1..118"),
    Field("positions", "array", "float32", ("N", 3), "atom", "Å", True, "Cartesian positions"),
    Field("cell", "array", "float64", (3, 3), "graph", "Å", True, "cell vectors as rows; zeros when not periodic"),
    Field("pbc", "array", "bool", (3,), "graph", "", True, "periodicity per cell axis"),
    Field("charge", "int", "int64", (), "graph", "e", False, "total charge"),
    Field("spin", "int", "int64", (), "graph", "", False, "spin multiplicity 2S+1"),
    Field("energy", "float", "float64", (), "graph", "eV", False, "total energy label"),
    Field("forces", "array", "float32", ("N", 3), "atom", "eV/Å", False, "force labels"),
    Field("properties", "map", "float64", (), "graph", "", False, "named per-structure labels, e.g. QM9 homo"),
    Field("property_units", "map", "str", (), "graph", "", False, "unit of each named property"),
    Field("bonds", "array", "int32", ("B", 2), "bond", "", False, "covalent bonds as atom index pairs"),
    Field("bond_order", "array", "float32", ("B",), "bond", "", False, "bond order (1, 1.5 aromatic, 2, 3)"),
    Field("residue_index", "array", "int32", ("N",), "atom", "", False, "residue sequence number per atom"),
    Field("residue_name", "array", "S4", ("N",), "atom", "", False, "residue name per atom"),
    Field("chain", "array", "S4", ("N",), "atom", "", False, "chain identifier per atom"),
    Field("atom_name", "array", "S4", ("N",), "atom", "", False, "atom name per atom (PDB convention)"),
    Field("hetero", "array", "bool", ("N",), "atom", "", False, "hetero atom flag (ligands, waters, ions)"),
    Field("trajectory_id", "str", "str", (), "graph", "", False, "trajectory identifier for MD frames"),
    Field("frame_time", "float", "float64", (), "graph", "ps", False, "simulation time of an MD frame"),
)
FIELD_BY_NAME: dict[str, Field] = {f.name: f for f in FIELDS}
ARRAY_FIELDS: tuple[Field, ...] = tuple(f for f in FIELDS if f.kind == "array")
SCALAR_FIELDS: tuple[Field, ...] = tuple(f for f in FIELDS if f.kind != "array")


def make_key(source: str, file_id: str, index: int) -> str:
    """A stable key from (source, file identity, record index): ``<source>-<16 hex>``."""
    digest = hashlib.blake2b(f"{source}\0{file_id}\0{index}".encode(), digest_size=8).hexdigest()
    return f"{_slug(source)}-{digest}"


class FileKeys:
    """``make_key(source, file_id, index)`` for the records of one file, the hash of the shared prefix computed
    once (half the cost of a key for a container file's many records)."""

    __slots__ = ("_prefix", "_state", "valid")

    def __init__(self, source: str, file_id: str) -> None:
        self._state = hashlib.blake2b(f"{source}\0{file_id}\0".encode(), digest_size=8)
        self._prefix = f"{_slug(source)}-"
        # every key is the prefix and 16 hex digits, so one match decides whether all of them match KEY_RE
        self.valid: bool = KEY_RE.match(self._prefix + "0" * 16) is not None

    def __call__(self, index: int) -> str:
        h = self._state.copy()
        h.update(b"%d" % index)
        return self._prefix + h.hexdigest()

    def many(self, indices: range) -> list[str]:
        """The keys of ``indices``, in one loop."""
        out: list[str] = []
        append, copy, prefix = out.append, self._state.copy, self._prefix
        for i in indices:
            h = copy()
            h.update(b"%d" % i)
            append(prefix + h.hexdigest())
        return out


@lru_cache(maxsize=1024)
def _slug(source: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-]", "_", source)[:40] or "x"


@dataclass(frozen=True, eq=False, init=False)
class AtomGraph:
    """One structure in the unified schema. Construction validates; arrays are read-only."""

    key: str
    domain: str
    source: str
    source_file: str
    index: int
    atomic_numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    charge: int | None = None
    spin: int | None = None
    energy: float | None = None
    forces: np.ndarray | None = None
    properties: Mapping[str, float] | None = None
    property_units: Mapping[str, str] | None = None
    bonds: np.ndarray | None = None
    bond_order: np.ndarray | None = None
    residue_index: np.ndarray | None = None
    residue_name: np.ndarray | None = None
    chain: np.ndarray | None = None
    atom_name: np.ndarray | None = None
    hetero: np.ndarray | None = None
    trajectory_id: str | None = None
    frame_time: float | None = None

    def __init__(self, key: str, domain: str, source: str, source_file: str, index: int, atomic_numbers: np.ndarray,
                 positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, charge: int | None = None,
                 spin: int | None = None, energy: float | None = None, forces: np.ndarray | None = None,
                 properties: Mapping[str, float] | None = None, property_units: Mapping[str, str] | None = None,
                 bonds: np.ndarray | None = None, bond_order: np.ndarray | None = None,
                 residue_index: np.ndarray | None = None, residue_name: np.ndarray | None = None,
                 chain: np.ndarray | None = None, atom_name: np.ndarray | None = None, hetero: np.ndarray | None = None,
                 trajectory_id: str | None = None, frame_time: float | None = None) -> None:
        # the fields in one step, then validated: the dataclass's own frozen __init__ sets each field through
        # object.__setattr__, which costs twice as much per record (a test pins this signature to the fields)
        self.__dict__.update(
            key=key, domain=domain, source=source, source_file=source_file, index=index, atomic_numbers=atomic_numbers,
            positions=positions, cell=cell, pbc=pbc, charge=charge, spin=spin, energy=energy, forces=forces,
            properties=properties, property_units=property_units, bonds=bonds, bond_order=bond_order,
            residue_index=residue_index, residue_name=residue_name, chain=chain, atom_name=atom_name, hetero=hetero,
            trajectory_id=trajectory_id, frame_time=frame_time)
        validate_graph(self)

    @property
    def n_atoms(self) -> int:
        return int(self.atomic_numbers.shape[0])

    @property
    def n_bonds(self) -> int:
        return 0 if self.bonds is None else int(self.bonds.shape[0])

    @property
    def periodic(self) -> bool:
        return bool(self.pbc.any())

    def replace(self, **changes: Any) -> AtomGraph:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in FIELDS}

    def equals(self, other: AtomGraph) -> bool:
        """Bit-exact equality of every field."""
        for f in FIELDS:
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.kind == "array":
                if (a is None) != (b is None):
                    return False
                if a is not None and (a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes()):
                    return False
            elif f.kind == "float" and a is not None and b is not None:
                if not (a == b or (math.isnan(a) and math.isnan(b))):
                    return False
            elif a != b:
                return False
        return True

    # Interop -------------------------------------------------------------------------
    @classmethod
    def from_ase(cls, atoms: Any, *, key: str, domain: str, source: str, source_file: str = "",
                 index: int = 0, **extra: Any) -> AtomGraph:
        from shards.format.interop import graph_from_ase

        return graph_from_ase(atoms, key=key, domain=domain, source=source, source_file=source_file,
                              index=index, **extra)

    def to_ase(self) -> Any:
        from shards.format.interop import graph_to_ase

        return graph_to_ase(self)

    @classmethod
    def from_pymatgen(cls, structure: Any, *, key: str, domain: str, source: str, source_file: str = "",
                      index: int = 0, **extra: Any) -> AtomGraph:
        from shards.format.interop import graph_from_pymatgen

        return graph_from_pymatgen(structure, key=key, domain=domain, source=source,
                                   source_file=source_file, index=index, **extra)

    def to_pymatgen(self) -> Any:
        from shards.format.interop import graph_to_pymatgen

        return graph_to_pymatgen(self)


def check_schema_version(version: str, where: str) -> tuple[int, int]:
    """Parse ``"MAJOR.MINOR"``; refuse an unknown major version, naming ``where``."""
    try:
        major, minor = (int(x) for x in str(version).split("."))
    except ValueError:
        raise SchemaVersionError(f"{where}: malformed schema version {version!r}") from None
    if major != SCHEMA_VERSION[0]:
        raise SchemaVersionError(
            f"{where}: schema version {version} is not supported (this reader knows major "
            f"{SCHEMA_VERSION[0]}); upgrade the package or re-ingest the data")
    return major, minor


class SchemaVersionError(ValueError):
    """Data written with a schema major version this reader does not know."""


# imported last: the validator is driven by this module's field table (a function-level import per record costs
# as much as the rest of a small molecule's checks)
from shards.format.validate import validate_graph  # noqa: E402
