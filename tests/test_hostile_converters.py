"""Hostile inputs made from real data-kit files: nothing is dropped silently, every failure is a reject with its
reason and record index, memory stays bounded on decompression bombs, and real files are still all accepted.

Record counts are computed here from what each test wrote (independent of the converters' own counting)."""
from __future__ import annotations

import gzip
import io
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from ingest.plugin import Reject
from ingest.registry import get_converter
from scd_train.datakit import package_dir
from shards.format.schema import AtomGraph
from tests.convhelp import convert, mda_data, rdkit_file

RATIO, FLOOR = 50, 32 * 1024 ** 2  # documented defaults of max_compression_ratio and the 32 MiB floor


def _accounted(items_s: list[AtomGraph], items_r: list[Reject], n_records: int) -> dict[int, AtomGraph | Reject]:
    """inputs = samples + rejects, each record index of the file exactly once."""
    by_index: dict[int, AtomGraph | Reject] = {}
    for item in [*items_s, *items_r]:
        idx = item.index if isinstance(item, AtomGraph) else item.record
        assert idx is not None and idx not in by_index, item
        by_index[idx] = item
    assert sorted(by_index) == list(range(n_records))
    return by_index


# ---------------------------------------------------------------- XYZ: a bad frame costs that frame only

def _g2_frames(n: int) -> list[tuple[bytes, np.ndarray]]:
    """The first ``n`` molecules of ASE's G2 set as extended-XYZ frames, with their positions."""
    import ase.io
    from ase.collections import g2

    out = []
    for atoms in list(g2)[:n]:
        buf = io.StringIO()
        ase.io.write(buf, atoms, format="extxyz")
        out.append((buf.getvalue().encode(), atoms.positions.copy()))
    return out


def _hostile_xyz() -> tuple[bytes, dict[int, str], list[np.ndarray]]:
    """12 real frames; frame 3 announces 2 atoms too many, frame 7's count line is garbage, frame 9's comment
    holds undecodable bytes, frame 10 announces one atom too few. Returns (bytes, expected rejects, positions)."""
    frames = _g2_frames(12)
    parts, bad = [], {}
    for i, (text, pos) in enumerate(frames):
        lines = text.split(b"\n")
        n = len(pos)
        if i == 3:
            lines[0] = str(n + 2).encode()
            bad[i] = f"the atom-count line says {n + 2} atoms but {n} atom lines follow"
        elif i == 7:
            lines[0] = b"garbage"
            bad[i] = "not an atom-count line: 'garbage'"
        elif i == 9:
            lines[1] = lines[1] + b" \xff\xfe\x80 not utf-8"
        elif i == 10:
            lines[0] = str(n - 1).encode()
            bad[i] = f"the atom-count line says {n - 1} atoms but more atom lines follow"
        parts.append(b"\n".join(lines))
    return b"".join(parts), bad, [p for _, p in frames]


@pytest.mark.parametrize("gz", [False, True])
def test_xyz_bad_frames_are_one_reject_each(tmp_path: Path, gz: bool) -> None:
    data, bad, positions = _hostile_xyz()
    path = tmp_path / ("frames.xyz.gz" if gz else "frames.xyz")
    path.write_bytes(gzip.compress(data) if gz else data)
    samples, rejects = convert("xyz", path)
    by_index = _accounted(samples, rejects, len(positions))
    assert {r.record: r.reason for r in rejects} == bad
    for i, item in by_index.items():
        if i not in bad:
            assert isinstance(item, AtomGraph)
            np.testing.assert_allclose(item.positions, positions[i], atol=1e-5)
    conv = get_converter("xyz")()
    assert conv.count_records(path, conv.parse_options({})) == len(positions)


def test_xyz_record_ranges_cover_the_file_once(tmp_path: Path) -> None:
    data, bad, positions = _hostile_xyz()
    path = tmp_path / "frames.xyz"
    path.write_bytes(data)
    seen: list[int] = []
    for rng in (range(0, 4), range(4, 8), range(8, 12), range(12, 14)):
        samples, rejects = convert("xyz", path, records=rng)
        beyond = [r.record for r in rejects if r.reason == "record beyond the end of the file"]
        assert beyond == [r for r in rng if r >= len(positions)]
        seen += [g.index for g in samples] + [r.record for r in rejects if r.record not in beyond]
        assert {r.record for r in rejects if r.record in bad} == {i for i in bad if i in rng}
    assert sorted(seen) == list(range(len(positions)))


def test_xyz_without_any_frame_is_one_file_reject(tmp_path: Path) -> None:
    path = tmp_path / "junk.xyz"
    path.write_bytes(b"\x89PNG\r\n\x1a\n not a molecule at all\n")
    samples, (rej,) = convert("xyz", path)
    assert not samples and rej.record is None and rej.reason.startswith("no XYZ frame in the file")


def test_xyz_accounting_in_a_planned_job_counts_records(tmp_path: Path) -> None:
    """Through the job planner and units (split into record ranges): per-file inputs equal the file's records."""
    from ingest.job import load_job, plan_units
    from ingest.unit import run_unit
    from shards.format.writer import WriterConfig

    data, bad, positions = _hostile_xyz()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.xyz").write_bytes(data)
    (tmp_path / "in" / "b.xyz").write_bytes(b"".join(t for t, _ in _g2_frames(5)))
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"output": "out", "sources": [
        {"source": "x", "converter": "xyz", "paths": [str(tmp_path / "in" / "*.xyz")], "records_per_unit": 5}]}))
    cfg = load_job(job)
    (tmp_path / "out").mkdir()
    rows = [row for unit in plan_units(cfg)
            for row in run_unit(unit, str(tmp_path / "out"), WriterConfig()).to_dict()["files"]]
    per_file: dict[str, list[int]] = {}
    for row in rows:
        acc = per_file.setdefault(Path(row["file"]).name, [0, 0, 0])
        acc[0] += row["inputs"]
        acc[1] += row["accepted"]
        acc[2] += row["rejected"]
    assert per_file["a.xyz"] == [len(positions), len(positions) - len(bad), len(bad)]
    assert per_file["b.xyz"] == [5, 5, 0]


# ---------------------------------------------------------------- PDB / mmCIF: atoms the parser would drop

def _adk_atoms() -> list[str]:
    return [ln for ln in (mda_data() / "adk_open.pdb").read_text().splitlines() if ln.startswith(("ATOM  ", "HETATM"))]


def _translated_copies(k: int, with_end: bool) -> str:
    """``k`` copies of adk_open (blank chain IDs), each shifted by 100 Å in x, as one PDB file."""
    out = []
    for c in range(k):
        for ln in _adk_atoms():
            out.append(ln[:30] + f"{float(ln[30:38]) + 100.0 * c:8.3f}" + ln[38:])
        if with_end:
            out.append("END")
    return "\n".join(out) + "\n"


@pytest.mark.parametrize("with_end", [False, True])
def test_pdb_repeated_atoms_are_rejected_with_counts(tmp_path: Path, with_end: bool) -> None:
    atoms = _adk_atoms()
    assert {ln[21] for ln in atoms} == {" "}, "the real file has blank chain IDs"
    path = tmp_path / "copies.pdb"
    path.write_text(_translated_copies(8, with_end))
    samples, (rej,) = convert("pdb", path)
    assert not samples and rej.record == 0
    assert rej.reason.startswith(f"the parser kept {len(atoms)} of the {8 * len(atoms)} atom records of model 0")
    assert "repeated_atoms: split" in rej.reason


def test_pdb_split_gives_every_copy(tmp_path: Path) -> None:
    atoms = _adk_atoms()
    ref = np.array([[float(ln[30:38]), float(ln[38:46]), float(ln[46:54])] for ln in atoms])
    path = tmp_path / "copies.pdb.gz"
    path.write_bytes(gzip.compress(_translated_copies(4, with_end=True).encode()))
    opts = {"repeated_atoms": "split"}
    samples, rejects = convert("pdb", path, opts)
    assert not rejects
    by_index = _accounted(samples, [], 4)
    for c, g in by_index.items():
        assert isinstance(g, AtomGraph) and g.n_atoms == len(atoms)
        np.testing.assert_allclose(np.sort(g.positions[:, 0]), np.sort(ref[:, 0] + 100.0 * c), atol=2e-3)
    conv = get_converter("pdb")()
    assert conv.count_records(path, conv.parse_options(opts)) == 4
    part, _ = convert("pdb", path, opts, records=range(2, 4))
    assert [g.index for g in part] == [2, 3]


def _mmcif_with_copies(tmp: Path, kinds: tuple[str, ...]) -> tuple[Path, int, int]:
    """1YJP.cif with its ``kinds`` (ATOM / HETATM) rows repeated under new serial numbers; (path, rows, copies)."""
    lines = (mda_data() / "mmcif" / "1YJP.cif").read_text().splitlines()
    rows = [i for i, ln in enumerate(lines) if ln.startswith(("ATOM ", "HETATM "))]
    copies = []
    for i in rows:
        tok = lines[i].split()
        if tok[0] in kinds:
            tok[1] = str(int(tok[1]) + 100000)
            copies.append(" ".join(tok))
    path = tmp / f"twice_{'_'.join(kinds)}.cif"
    path.write_text("\n".join(lines[: rows[-1] + 1] + copies + lines[rows[-1] + 1:]) + "\n")
    return path, len(rows), len(copies)


def test_mmcif_repeated_atoms_are_rejected(tmp_path: Path) -> None:
    path, n_rows, n_copies = _mmcif_with_copies(tmp_path, ("ATOM",))
    samples, (rej,) = convert("mmcif", path)
    assert not samples and rej.record == 0
    assert rej.reason.startswith(f"the parser kept {n_rows} of the {n_rows + n_copies} atom records of model 0")
    path, _, _ = _mmcif_with_copies(tmp_path, ("HETATM",))  # Biopython refuses repeated hetero residues outright
    samples, (rej,) = convert("mmcif", path)
    assert not samples and rej.record is None and rej.reason.endswith("('W', 8, ' ') defined twice")


REAL_PROTEINS = [("pdb", "adk_open.pdb", {}), ("pdb", "4E43.pdb", {}), ("pdb", "1osm.pdb.gz", {}),
                 ("pdb", "nmr_neopetrosiamide.pdb", {"models": "all"}), ("mmcif", "mmcif/1YJP.cif", {}),
                 ("mmcif", "mmcif/5PTI.cif.gz", {}), ("mmcif", "mmcif/3KPR.cif.gz", {"models": "all"})]


@pytest.mark.parametrize(("conv", "name", "opts"), REAL_PROTEINS)
def test_real_protein_files_keep_every_atom_record(conv: str, name: str, opts: dict) -> None:
    import Bio.PDB

    samples, rejects = convert(conv, mda_data() / name, opts)
    assert samples and not rejects
    if conv == "pdb":  # atoms kept (waters dropped by default) against a first-altloc count of the records
        text = (gzip.open if name.endswith(".gz") else open)(mda_data() / name, "rt").read()
        parser = Bio.PDB.PDBParser(QUIET=True)
        first = next(iter(parser.get_structure("x", io.StringIO(text))))
        assert samples[0].n_atoms == sum(1 for a in first.get_atoms() if a.get_parent().id[0] != "W")


# ---------------------------------------------------------------- decompression bombs

def _bomb(path: Path, megabytes: int) -> int:
    """A .pdb.gz of ``megabytes`` MB of REMARK lines before adk_open's atoms, as concatenated gzip members
    (cheap to write); returns the decompressed size."""
    line = ("REMARK 999 " + "padding " * 8).ljust(79) + "\n"
    block = "".join(line if i % 40 else line[:70] + f"{i:8d}\n" for i in range(12600)).encode()
    member = gzip.compress(block, 9)
    tail = ("\n".join(_adk_atoms()) + "\nEND\n").encode()
    reps = -(-megabytes * 10 ** 6 // len(block))
    with open(path, "wb") as fh:
        for _ in range(reps):
            fh.write(member)
        fh.write(gzip.compress(tail))
    return reps * len(block) + len(tail)


BOMB_SCRIPT = textwrap.dedent("""
    import json, re, sys, time, tracemalloc
    from pathlib import Path
    from ingest.plugin import safe_convert
    from ingest.registry import get_converter

    def kib(key):
        return int(re.search(key + r":\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1))

    conv = get_converter("pdb")()
    warm = Path(sys.argv[2])
    list(safe_convert(conv, warm, conv.parse_options({}), source="s", file_id=warm.name))
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    rss = kib("VmRSS")
    tracemalloc.start()
    t = time.perf_counter()
    items = list(safe_convert(conv, Path(sys.argv[1]), conv.parse_options({}), source="s", file_id="bomb.pdb.gz"))
    seconds = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1] / 2 ** 20
    print(json.dumps({"items": [[getattr(i, "record", "sample"), getattr(i, "reason", "")] for i in items],
                      "rss_growth_mb": (kib("VmHWM") - rss) / 1024, "traced_peak_mb": peak, "seconds": seconds}))
""")


def test_pdb_gz_bomb_rejected_quickly_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "bomb.pdb.gz"
    size = _bomb(path, 400)
    compressed = path.stat().st_size
    assert size > 400 * 10 ** 6 and compressed < 2.5 * 10 ** 6, (size, compressed)
    limit = max(FLOOR, RATIO * compressed)
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", BOMB_SCRIPT, str(path), str(mda_data() / "1osm.pdb.gz")],
                         capture_output=True, text=True, cwd=root, timeout=300, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["items"] == [[None, f"bomb.pdb.gz decompresses to more than {limit} bytes "
                                   "(max_decompressed_bytes / max_compression_ratio)"]]
    assert 0 < res["traced_peak_mb"] < 2.5 * limit / 2 ** 20 and res["rss_growth_mb"] < 3 * limit / 2 ** 20, res
    assert res["rss_growth_mb"] < 400, res  # the unbounded reader grew by ~2.9 GB on this input
    assert res["seconds"] < 30, res


def test_small_compressed_file_within_the_floor_is_read_and_the_bound_is_configurable(tmp_path: Path) -> None:
    """The same construction, small: over the ratio but under the 32 MiB floor it is read (the file itself is
    fine); an explicit max_decompressed_bytes rejects it."""
    path = tmp_path / "small.pdb.gz"
    size = _bomb(path, 12)
    assert size / path.stat().st_size > RATIO and size < FLOOR
    (g,), rejects = convert("pdb", path)
    assert not rejects and g.n_atoms == len(_adk_atoms())
    samples, (rej,) = convert("pdb", path, {"max_decompressed_bytes": 2_000_000})
    assert not samples and rej.record is None and rej.reason == (
        "small.pdb.gz decompresses to more than 2000000 bytes (max_decompressed_bytes / max_compression_ratio)")


def _gz_inputs(tmp: Path) -> list[tuple[str, Path]]:
    """Real data-kit files gzipped, one per converter that reads .gz."""
    out = []
    for conv, src, name in [
        ("sdf", rdkit_file("Contrib/Fastcluster/testdata/cdk2.sdf"), "cdk2.sdf.gz"),
        ("smiles", package_dir("rdkit") / "Data/NCI/first_5K.smi", "nci.smi.gz"),
        ("pdb", mda_data() / "adk_open.pdb", "adk.pdb.gz"),
        ("mmcif", mda_data() / "mmcif" / "1YJP.cif", "1yjp.cif.gz"),
        ("cif", package_dir("ase") / "test/testdata/minerals/cod_1010995.cif", "mineral.cif.gz"),
        ("pymatgen_json", package_dir("pymatgen") / "util/structures/LiFePO4.json", "lfp.json.gz"),
    ]:
        (tmp / name).write_bytes(gzip.compress(src.read_bytes()))
        out.append((conv, tmp / name))
    data, _, _ = _hostile_xyz()
    (tmp / "g2.xyz.gz").write_bytes(gzip.compress(data))
    return [*out, ("xyz", tmp / "g2.xyz.gz")]


def test_every_gz_reader_is_bounded(tmp_path: Path) -> None:
    for conv, path in _gz_inputs(tmp_path):
        limit = 1024  # below every file's size: the first read of the stream passes it
        with gzip.open(path) as fh:
            assert len(fh.read()) > limit
        samples, rejects = convert(conv, path, {"max_decompressed_bytes": limit})
        assert not samples and len(rejects) == 1 and rejects[0].record is None, (conv, rejects)
        assert rejects[0].reason == (f"{path.name} decompresses to more than {limit} bytes "
                                     "(max_decompressed_bytes / max_compression_ratio)"), conv
        if conv in ("sdf", "smiles", "xyz", "pdb"):  # the converters that count records read the file too
            counter = get_converter(conv)()
            extra = {"models": "all"} if conv == "pdb" else {}
            opts = counter.parse_options({"max_decompressed_bytes": limit, **extra})
            with pytest.raises(ValueError, match="decompresses to more than"):
                counter.count_records(path, opts)


def test_streaming_reader_keeps_records_before_the_bound(tmp_path: Path) -> None:
    """SDF is read as a stream: records decoded before the bound are samples, the bound is one reject after them."""
    src = rdkit_file("Contrib/Fastcluster/testdata/cdk2.sdf").read_bytes()
    path = tmp_path / "cdk2.sdf.gz"
    path.write_bytes(gzip.compress(src))
    limit = len(src) // 2
    samples, (rej,) = convert("sdf", path, {"max_decompressed_bytes": limit})
    k = len(samples)
    assert 0 < k < src.count(b"$$$$") and [g.index for g in samples] == list(range(k))
    assert sum(len(r) + 5 for r in src.split(b"$$$$\n")[:k]) <= limit + (1 << 16)
    assert rej.record == k and rej.reason == (f"{path.name} decompresses to more than {limit} bytes "
                                              "(max_decompressed_bytes / max_compression_ratio)")


# ---------------------------------------------------------------- crystals: physically impossible cells

def _write_structure(path: Path, structure) -> Path:
    path.write_text(json.dumps(structure.as_dict()))
    return path


def _min_image_distance(structure) -> float:
    """Brute force: the shortest distance between two atoms, or an atom and its own periodic image."""
    lat = np.array(structure.lattice.matrix)
    frac = np.mod(np.array(structure.frac_coords), 1.0)
    cart = frac @ lat
    shifts = np.array([[a, b, c] for a in range(-2, 3) for b in range(-2, 3) for c in range(-2, 3)]) @ lat
    d = np.linalg.norm(cart[None, :, None, :] + shifts[None, None] - cart[:, None, None, :], axis=-1)
    n = len(cart)
    d[np.arange(n), np.arange(n), len(shifts) // 2] = np.inf  # an atom and itself, unshifted
    return float(d.min())


def _si():
    from pymatgen.core import Structure

    return Structure.from_file(str(package_dir("pymatgen") / "util/structures/Si.json"))


def test_tiny_cell_is_rejected(tmp_path: Path) -> None:
    from pymatgen.core import Lattice, Structure

    si = _si()
    tiny = Structure(Lattice(si.lattice.matrix * (0.2 / max(si.lattice.abc))), si.species, si.frac_coords)
    shortest = min(tiny.lattice.abc)
    path = _write_structure(tmp_path / "tiny.json", tiny)
    samples, (rej,) = convert("pymatgen_json", path)
    assert not samples and rej.record == 0
    assert rej.reason == f"cell length {shortest:.4g} Å is below min_cell_length 1.0 Å"
    samples, (rej,) = convert("pymatgen_json", path, {"min_cell_length": 0.0})
    assert not samples and rej.record == 0
    d = _min_image_distance(tiny)
    assert re.fullmatch(rf"atoms [01] and [01] are {d:.4g} Å apart \(minimum image, after wrapping\), "
                        r"below min_distance 0\.5 Å", rej.reason), rej.reason


def test_overlapping_atoms_by_minimum_image(tmp_path: Path) -> None:
    si = _si()
    a = si.lattice.abc[0]
    crowded = si.copy()
    # a third atom 0.3 Å from atom 0 across the periodic boundary: only the minimum image shows it
    crowded.append("Si", si[0].coords - np.array(si.lattice.matrix[0]) * (1 - 0.3 / a), coords_are_cartesian=True,
                   validate_proximity=False)
    d = _min_image_distance(crowded)
    path = _write_structure(tmp_path / "crowded.json", crowded)
    samples, (rej,) = convert("pymatgen_json", path)
    assert not samples and rej.record == 0
    assert rej.reason == (f"atoms 0 and 2 are {d:.4g} Å apart (minimum image, after wrapping), "
                          "below min_distance 0.5 Å")
    assert d < 0.5 < float(np.linalg.norm(crowded[2].coords - crowded[0].coords))
    ok, rejects = convert("pymatgen_json", path, {"min_distance": round(d, 3) - 0.01})
    assert len(ok) == 1 and not rejects


def test_negative_and_flat_cells(tmp_path: Path) -> None:
    from pymatgen.core import Lattice, Structure

    src = next((package_dir("ase") / "test/testdata/minerals").glob("cod_*.cif"))
    text = src.read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("_cell_length_a"))
    value = line.split()[1]
    neg = tmp_path / "negative.cif"
    neg.write_text(text.replace(line, f"_cell_length_a -{value}"))
    samples, (rej,) = convert("cif", neg)
    number = float(value.split("(")[0])
    assert not samples and rej.record == 0 and rej.reason == (
        f"_cell_length_a is {-number}: cell lengths must be positive")
    si = _si()
    m = np.array(si.lattice.matrix)
    m[2] = m[0] + m[1] + 1e-5 * m[2]
    flat = Structure(Lattice(m), si.species, si.frac_coords)
    samples, (rej,) = convert("pymatgen_json", _write_structure(tmp_path / "flat.json", flat))
    assert not samples and rej.record == 0 and rej.reason.startswith("degenerate cell: volume")


@pytest.mark.slow
def test_real_crystals_of_the_data_kit_are_all_accepted(tmp_path: Path) -> None:
    import ase.io
    from ase.collections import dcdft

    files = [(p, {}) for p in sorted((package_dir("pyxtal") / "database" / "cifs").iterdir())
             if p.suffix in (".cif", ".vasp")]
    for p in sorted((package_dir("pymatgen") / "util" / "structures").glob("*.json")):
        files.append((p, {"order": "majority"} if p.stem == "Li10GeP2S12" else {}))
    files += [(p, {}) for p in sorted((package_dir("ase") / "test/testdata/minerals").glob("*.cif"))]
    with gzip.open(package_dir("pymatgen") / "analysis/prototypes/aflow_prototypes.json.gz", "rt") as fh:
        aflow = [e["snl"] for e in json.load(fh)]
    (tmp_path / "aflow.json").write_text(json.dumps(aflow))
    files.append((tmp_path / "aflow.json", {}))
    for atoms in dcdft:
        p = tmp_path / f"{atoms.get_chemical_formula()}.vasp"
        ase.io.write(p, atoms, format="vasp")
        files.append((p, {}))
    assert len(files) >= 180
    n_samples = 0
    for p, opts in files:
        conv = {".cif": "cif", ".vasp": "poscar", ".json": "pymatgen_json"}[p.suffix]
        samples, rejects = convert(conv, p, opts)
        assert samples and not rejects, (p.name, rejects[:2])
        n_samples += len(samples)
    assert n_samples >= len(files) - 1 + len(aflow)


def test_documented_bounds_example_is_valid() -> None:
    """The job sources of docs/converters.md's hostile-input section name real converters and valid options."""
    from ingest.job import SourceSpec
    from shards.config import from_dict

    text = (Path(__file__).parent.parent / "docs" / "converters.md").read_text()
    section = text[text.index("## Hostile inputs"):text.index("## Container formats")]
    (block,) = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
    names = []
    for raw in yaml.safe_load(block)["sources"]:
        spec = from_dict(SourceSpec, raw, where="docs")
        get_converter(spec.converter)().parse_options(spec.options)
        names.append(spec.converter)
    assert names == ["pdb", "cif"]
    with pytest.raises(Exception, match="max_compression_ratio"):
        get_converter("pdb")().parse_options({"max_compression_ratio": 0.5})


@pytest.mark.parametrize("stride", [1, 2])
def test_xyz_trajectory_bad_frames_are_one_reject_each(tmp_path: Path, stride: int) -> None:
    """ase_traj reads multi-frame XYZ with the same records: record r is file record r * stride."""
    data, bad, positions = _hostile_xyz()
    path = tmp_path / "traj.xyz.gz"
    path.write_bytes(gzip.compress(data))
    samples, rejects = convert("ase_traj", path, {"stride": stride})
    chosen = list(range(0, len(positions), stride))
    by_index = _accounted(samples, rejects, len(chosen))
    assert {r.record: r.reason for r in rejects} == {k // stride: why for k, why in bad.items() if k % stride == 0}
    for r, item in by_index.items():
        if isinstance(item, AtomGraph):
            np.testing.assert_allclose(item.positions, positions[chosen[r]], atol=1e-5)
            assert item.properties["frame"] == chosen[r]


def test_xyz_absurd_atom_count_is_one_reject(tmp_path: Path) -> None:
    frames = _g2_frames(3)
    path = tmp_path / "absurd.xyz"
    first = frames[0][0].split(b"\n", 1)
    path.write_bytes(b"9999999999\n" + first[1] + frames[1][0] + frames[2][0])
    samples, (rej,) = convert("xyz", path)
    assert [g.index for g in samples] == [1, 2] and rej.record == 0
    assert rej.reason.startswith("the atom-count line says 9999999999 atoms, more than a sample may hold")


def test_xyz_blank_lines_and_vec_lattices_do_not_end_the_file(tmp_path: Path) -> None:
    """ASE's own reader stops at the first blank line; every frame after it is still a record here."""
    frames = _g2_frames(4)
    vec = b"VEC1 6.0 0.0 0.0\nVEC2 0.0 7.0 0.0\nVEC3 0.0 0.0 8.0\n"
    path = tmp_path / "gaps.xyz"
    path.write_bytes(frames[0][0] + vec + b"\n\n" + frames[1][0] + b"\n" + frames[2][0] + b"   \n" + frames[3][0])
    samples, rejects = convert("xyz", path)
    by_index = _accounted(samples, rejects, 4)
    assert not rejects
    assert np.allclose(by_index[0].cell, np.diag([6.0, 7.0, 8.0])) and by_index[0].pbc.all()
    for i, g in by_index.items():
        np.testing.assert_allclose(g.positions, frames[i][1], atol=1e-5)


def test_real_molecules_as_xyz_are_all_accepted(tmp_path: Path) -> None:
    import ase.io
    from ase.collections import g2, s22

    mols = [*g2, *s22]
    buf = io.StringIO()
    for atoms in mols:
        ase.io.write(buf, atoms, format="extxyz")
    path = tmp_path / "g2_s22.xyz.gz"
    path.write_bytes(gzip.compress(buf.getvalue().encode()))
    samples, rejects = convert("xyz", path)
    assert not rejects and len(samples) == len(mols) == 162 + 22
    for g, atoms in zip(samples, mols, strict=True):
        assert g.atomic_numbers.tolist() == atoms.numbers.tolist()
