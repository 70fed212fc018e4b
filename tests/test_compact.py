"""`scd shards compact`: several datasets of small shards rewritten into target-size shards with the same
samples (byte for byte, same keys) in source order, byte-identical on re-run, verified, provenance kept;
damaged sources and unsafe outputs refused; `inspect` shows the shard-size distribution."""
from __future__ import annotations

import hashlib
import json
import math
import tarfile
from pathlib import Path

import pytest
from conftest_ray import digest

from shards.format.audit import inspect_dataset, verify_dataset
from shards.format.manifest import write_dataset
from shards.format.writer import WriterConfig
from shards.tools.cli import main as scd
from shards.tools.compact import compact


def members(root: Path) -> list[tuple[str, bytes]]:
    """(member name, bytes) of every shard in manifest order, read with the standard tarfile module."""
    manifest = json.loads((root / "manifest.json").read_text())
    out = []
    for s in manifest["shards"]:
        with tarfile.open(root / s["name"]) as tar:
            out += [(m.name, tar.extractfile(m).read()) for m in tar]
    return out


@pytest.fixture()
def sources(tmp_path, real_graphs):
    a, b = tmp_path / "a", tmp_path / "b"
    write_dataset(real_graphs[:100], a, config=WriterConfig(max_shard_samples=7),
                  extra={"accounting": {"total": {"inputs": 101, "accepted": 100, "rejected": 1}}})
    write_dataset(real_graphs[100:], b, config=WriterConfig(max_shard_samples=3), prefix="other")
    return a, b


def test_compact_same_samples_target_shards_rerun_identical_verified(sources, tmp_path, real_graphs):
    a, b = sources
    out = tmp_path / "c"
    manifest = compact([str(a), str(b)], out, config=WriterConfig(max_shard_samples=50))
    src = members(a) + members(b)
    assert members(out) == src, "same samples, same bytes, sources in order"
    assert len(src) == len(real_graphs)
    assert len(manifest["shards"]) == math.ceil(len(src) / 50)
    assert [s["n_samples"] for s in manifest["shards"]][:-1] == [50] * (len(manifest["shards"]) - 1)
    assert verify_dataset(str(out)).ok
    first = digest(out)
    compact([str(a), str(b)], out, config=WriterConfig(max_shard_samples=50))
    assert digest(out) == first, "byte-identical re-run"
    prov = manifest["compacted_from"]
    assert [p["dataset"] for p in prov] == ["a", "b"]
    assert prov[0]["accounting"] == {"total": {"inputs": 101, "accepted": 100, "rejected": 1}}
    assert prov[1]["manifest_sha256"] == hashlib.sha256((b / "manifest.json").read_bytes()).hexdigest()
    assert [p["n_samples"] for p in prov] == [100, len(real_graphs) - 100]
    cli_out = tmp_path / "cli"
    assert scd(["shards", "compact", str(a), str(b), "--out", str(cli_out), "--max-shard-samples", "50"]) == 0
    assert digest(cli_out) == first
    assert scd(["shards", "verify", str(cli_out)]) == 0


def test_inspect_shows_the_shard_size_distribution(sources, tmp_path, capsys):
    a, _ = sources
    sizes = sorted((a / s["name"]).stat().st_size for s in json.loads((a / "manifest.json").read_text())["shards"])
    info = inspect_dataset(str(a))["shard_sizes"]
    assert info["shards"] == len(sizes) == math.ceil(100 / 7)
    assert info["minimum"] == math.ceil(100 / 7)
    assert (info["bytes"]["min"], info["bytes"]["max"]) == (sizes[0], sizes[-1])
    assert (info["samples"]["min"], info["samples"]["max"]) == (100 % 7, 7)
    assert sum(info["fill_histogram"].values()) == len(sizes) and info["fill_histogram"]["90-100%"] == 100 // 7
    assert scd(["shards", "inspect", str(a)]) == 0
    assert f"shard sizes: {len(sizes)} shards" in capsys.readouterr().out


def test_compact_refuses_damaged_sources_and_unsafe_outputs(sources, tmp_path, capsys):
    a, b = sources
    with pytest.raises(ValueError, match="is one of the sources"):
        compact([str(a), str(b)], a)
    with pytest.raises(ValueError, match="did not write"):
        compact([str(b)], a)
    with pytest.raises(ValueError, match="duplicate sample key"):
        compact([str(a), str(a)], tmp_path / "dup")
    shard = a / json.loads((a / "manifest.json").read_text())["shards"][3]["name"]
    data = bytearray(shard.read_bytes())
    data[700] ^= 1  # inside the first sample's bytes, size unchanged
    shard.write_bytes(bytes(data))
    out = tmp_path / "bad"
    assert scd(["shards", "compact", str(a), str(b), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert shard.name in err and "sha256" in err
    assert not (out / "manifest.json").exists(), "no dataset from a damaged source"


def test_compact_reads_sources_over_http(sources, tmp_path, http_root):
    base, served = http_root
    a, b = sources
    assert served == tmp_path  # the fixture serves this test's folder
    local = compact([str(a), str(b)], tmp_path / "local", config=WriterConfig(max_shard_samples=40))
    remote = compact([f"{base}/a", f"{base}/b/"], tmp_path / "remote", config=WriterConfig(max_shard_samples=40))
    assert remote == local
    assert digest(tmp_path / "remote") == digest(tmp_path / "local")
