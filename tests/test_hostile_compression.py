"""Decompression bombs: every .gz reader rejects past its bound, quickly and in bounded memory, as documented."""
from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from ingest.registry import get_converter
from scd_train.datakit import package_dir
from tests.convhelp import convert, mda_data, rdkit_file
from tests.hostilehelp import adk_atoms, hostile_xyz

RATIO, FLOOR = 50, 32 * 1024 ** 2  # documented defaults of max_compression_ratio and the 32 MiB floor


# ---------------------------------------------------------------- decompression bombs

def _bomb(path: Path, megabytes: int) -> int:
    """A .pdb.gz of ``megabytes`` MB of REMARK lines before adk_open's atoms, as concatenated gzip members
    (cheap to write); returns the decompressed size."""
    line = ("REMARK 999 " + "padding " * 8).ljust(79) + "\n"
    block = "".join(line if i % 40 else line[:70] + f"{i:8d}\n" for i in range(12600)).encode()
    member = gzip.compress(block, 9)
    tail = ("\n".join(adk_atoms()) + "\nEND\n").encode()
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
    assert not rejects and g.n_atoms == len(adk_atoms())
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
    data, _, _ = hostile_xyz()
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
