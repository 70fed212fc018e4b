"""The node cache of split remote inputs: one download per file and node, bounded by the spool limit (least
recently used evicted first), never used at a size other than the listed one, links that outlive eviction."""
from __future__ import annotations

import os

from ingest.spool import cache_root, cached_link, forget_cached, local_copy


def _serve(http_root, sizes: dict[str, int]) -> dict[str, tuple[str, bytes]]:
    base, folder = http_root
    out = {}
    for name, n in sizes.items():
        data = os.urandom(n)
        (folder / name).write_bytes(data)
        out[name] = (f"{base}/{name}", data)
    return out


def _read_through(url: str, data: bytes, limit: int) -> None:
    with local_copy(url, limit, shared=(len(data), "etag-1")) as path:
        assert path.read_bytes() == data


def test_one_download_per_file_then_least_recently_used_eviction(http_root, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SCD_SPOOL_DIR", str(tmp_path / "spool"))
    files = _serve(http_root, {"a.h5": 1000, "b.h5": 1000, "c.h5": 1000})
    for _ in range(3):
        _read_through(*files["a.h5"], limit=2500)
    _read_through(*files["b.h5"], limit=2500)
    os.utime(next(e for e in cache_root().iterdir() if (e / "b.h5").exists()), (1, 1))  # b used long ago
    _read_through(*files["a.h5"], limit=2500)
    _read_through(*files["c.h5"], limit=2500)  # 3000 bytes would exceed 2500: b, the least recent, goes
    cached = sorted(f.name for e in cache_root().iterdir() for f in e.iterdir())
    assert cached == ["a.h5", "c.h5"]
    assert http_root.gets == ["/a.h5", "/b.h5", "/c.h5"]
    _read_through(*files["b.h5"], limit=2500)
    assert http_root.gets[-1] == "/b.h5" and len(http_root.gets) == 4
    spool = tmp_path / "spool"
    assert sorted(p.name for p in spool.iterdir()) == ["scd-cache"], "each unit's spool folder removed"
    forget_cached((url, (len(data), "etag-1")) for url, data in files.values())
    assert not list(cache_root().iterdir())


def test_a_changed_or_damaged_copy_is_never_read(http_root, tmp_path, monkeypatch) -> None:
    """A file whose size differs from the listing (changed since planning) is read from its one download and
    not cached; a cached copy damaged on disk is downloaded again; a URL's other version is another entry."""
    monkeypatch.setenv("SCD_SPOOL_DIR", str(tmp_path / "spool"))
    (url, data), = _serve(http_root, {"x.db": 500}).values()
    with local_copy(url, 10_000, shared=(400, "etag-1")) as path:
        assert path.read_bytes() == data
    assert not list(cache_root().iterdir())
    _read_through(url, data, 10_000)
    (entry,) = cache_root().iterdir()
    assert (entry / "x.db").stat().st_mode & 0o777 == 0o444  # the units' shared copy is read-only
    os.chmod(entry / "x.db", 0o644)
    (entry / "x.db").write_bytes(data[:100])
    _read_through(url, data, 10_000)
    assert (entry / "x.db").read_bytes() == data and http_root.gets.count("/x.db") == 3
    assert not cached_link(url, (0, "etag-1"), tmp_path / "unknown-size", 10_000)  # size unknown: not cached
    with local_copy(url, 10_000, shared=(500, "etag-2")) as path:
        assert path.read_bytes() == data
    assert len(list(cache_root().iterdir())) == 2


def test_a_unit_keeps_reading_its_copy_while_others_evict_it(http_root, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SCD_SPOOL_DIR", str(tmp_path / "spool"))
    files = _serve(http_root, {"big1.npz": 800, "big2.npz": 800})
    url1, data1 = files["big1.npz"]
    with local_copy(url1, 1000, shared=(800, "e")) as held:
        _read_through(*files["big2.npz"], limit=1000)  # evicts big1 from the cache
        assert [f.name for e in cache_root().iterdir() for f in e.iterdir()] == ["big2.npz"]
        assert held.read_bytes() == data1
    assert not held.exists()
