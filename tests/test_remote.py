"""Shards from remote storage: http(s) through urllib with retries, s3:// (any fsspec URL) through fsspec,
a bounded local shard cache, and one-line errors naming the URL on permanent failures."""
from __future__ import annotations

import http.server
import itertools
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from s3help import moto_s3  # noqa: F401 - the shared moto S3 server fixture

from scd_train.config import DataConfig
from scd_train.data import make_stream
from shards.format import storage
from shards.format.manifest import write_dataset
from shards.format.reader import ShardDataset
from shards.format.writer import WriterConfig
from shards.stream.fetch import ShardCache
from shards.stream.mixture import MixtureConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(real_graphs, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("remote") / "ds"
    write_dataset(real_graphs[:60], root, config=WriterConfig(max_shard_samples=20))
    return root


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch):
    monkeypatch.setattr(storage, "BACKOFF_S", 0.01)


def _cfg(root: str, **kw) -> DataConfig:
    return DataConfig(datasets=(root,), mixture=MixtureConfig(crop_protein_atoms=300), seed=3, max_atoms=400,
                        **kw)


def _same(a: dict, b: dict) -> bool:
    keys = [k for k, v in a.items() if isinstance(v, np.ndarray)]
    return a["keys"] == b["keys"] and all(np.array_equal(a[k], b[k]) for k in keys)


class _Server:
    """A local http server over ``folder`` that answers the first ``fail`` requests with ``status``."""

    def __init__(self, folder: Path, *, fail: int = 0, status: int = 503) -> None:
        state = {"left": fail, "requests": 0}
        lock = threading.Lock()

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **k):
                super().__init__(*a, directory=str(folder), **k)

            def log_message(self, *a):
                pass

            def do_GET(self):
                with lock:
                    state["requests"] += 1
                    failing = state["left"] > 0
                    state["left"] -= failing
                if failing:
                    self.send_error(status)
                    return
                super().do_GET()

        self.state = state
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_location_helpers():
    assert storage.scheme("s3://b/ds") == "s3" and storage.scheme("/tmp/ds") == "" and storage.scheme("GS://b") == "gs"
    assert all(storage.is_url(u) for u in ("http://h/x", "https://h/x", "s3://b/x", "gs://b/x", "az://c/x"))
    assert not storage.is_url("/data/ds") and not storage.is_url("file:///data/ds") and not storage.is_url("rel/ds")
    assert storage.join("s3://bucket/ds/", "manifest.json") == "s3://bucket/ds/manifest.json"
    assert storage.join("file:///data/ds", "a.tar") == "/data/ds/a.tar"
    with pytest.raises(storage.FetchError, match="not a plain file name"):
        storage.join("s3://bucket/ds", "../secret")


def test_malformed_and_missing_backend_are_one_line_errors():
    with pytest.raises(storage.FetchError, match=r"^http:///x: malformed URL"):
        storage.read_bytes("http:///x")
    with pytest.raises(storage.FetchError, match=r"nosuchscheme://b/x: .*") as err:
        storage.read_bytes("nosuchscheme://b/x")
    assert "\n" not in str(err.value)


def test_http_dataset_reads_like_local(dataset, http_root):
    base, folder = http_root
    shutil.copytree(dataset, folder / "ds")
    remote, local = ShardDataset(f"{base}/ds/"), ShardDataset(str(dataset))
    assert remote.root == f"{base}/ds" and len(remote) == len(local)
    assert [g.key for g in remote] == [g.key for g in local]
    key = local.shard_index(local.shard_names[1])["key"][3]
    assert remote.get(key).key == key


def test_flaky_server_is_retried(dataset, tmp_path):
    shutil.copytree(dataset, tmp_path / "ds")
    server = _Server(tmp_path, fail=3, status=503)
    try:
        ds = ShardDataset(f"{server.url}/ds")
        assert server.state["requests"] == 4
        assert len(list(ds)) == len(ShardDataset(str(dataset)))
    finally:
        server.close()


def test_throttling_429_is_retried_then_gives_up(dataset, tmp_path):
    shutil.copytree(dataset, tmp_path / "ds")
    server = _Server(tmp_path, fail=100, status=429)
    try:
        with pytest.raises(storage.FetchError, match=rf"{server.url}/ds/manifest.json: failed after {storage.RETRIES}"):
            storage.read_bytes(f"{server.url}/ds/manifest.json")
        assert server.state["requests"] == storage.RETRIES
    finally:
        server.close()


def test_permanent_errors_are_not_retried(dataset, tmp_path):
    shutil.copytree(dataset, tmp_path / "ds")
    server = _Server(tmp_path, fail=100, status=403)
    try:
        with pytest.raises(storage.FetchError, match=r"manifest.json: HTTP 403"):
            storage.read_bytes(f"{server.url}/ds/manifest.json")
        assert server.state["requests"] == 1
    finally:
        server.close()


def test_connection_refused_names_the_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/ds/manifest.json"
    with pytest.raises(storage.FetchError, match=rf"^{url}: failed after"):
        storage.read_bytes(url)


def test_cli_404_is_one_line_without_traceback(http_root):
    base, _ = http_root
    proc = subprocess.run([sys.executable, "-m", "shards", "shards", "verify", f"{base}/missing"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert f"{base}/missing" in err and "404" in err


def test_http_stream_with_bounded_cache(dataset, http_root, tmp_path):
    base, folder = http_root
    shutil.copytree(dataset, folder / "ds")
    cache = tmp_path / "cache"
    biggest = max(s["n_bytes"] for s in ShardDataset(str(dataset)).manifest["shards"])
    local = list(itertools.islice(make_stream(_cfg(str(dataset))), 6))
    stream = make_stream(_cfg(f"{base}/ds", cache_dir=str(cache), cache_bytes=biggest))
    stream.fetcher.cache.max_open = 1
    remote = list(itertools.islice(stream, 6))
    assert all(_same(a, b) for a, b in zip(local, remote, strict=True))
    assert sum(p.stat().st_size for p in cache.iterdir()) <= biggest


def test_cache_rejects_bytes_that_disagree_with_the_manifest(dataset, http_root, tmp_path):
    base, folder = http_root
    shutil.copytree(dataset, folder / "ds")
    ds = ShardDataset(f"{base}/ds")
    name = ds.shard_names[0]
    blob = bytearray((folder / "ds" / name).read_bytes())
    blob[-1] ^= 0xFF
    (folder / "ds" / name).write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=rf"{name}: downloaded bytes do not match"):
        ShardCache(tmp_path / "cache").get(ds, name)


# ----------------------------------------------------------------------------------------------- S3
@pytest.fixture(scope="module")
def s3_dataset(moto_s3, dataset) -> str:  # noqa: F811 - the fixture imported above
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_s3})
    fs.mkdir("scd-test")
    fs.put(str(dataset), "scd-test/ds", recursive=True)
    fs.invalidate_cache()
    return "s3://scd-test/ds"


@pytest.mark.slow
def test_s3_dataset_reads_like_local(s3_dataset, dataset):
    remote, local = ShardDataset(s3_dataset), ShardDataset(str(dataset))
    assert len(remote) == len(local) and remote.shard_names == local.shard_names
    assert [g.key for g in remote] == [g.key for g in local]
    key = local.shard_index(local.shard_names[2])["key"][1]
    assert remote.get(key).key == key


@pytest.mark.slow
def test_s3_verify_and_inspect_like_local(s3_dataset, dataset):
    from shards.format.audit import inspect_dataset, verify_dataset

    rep = verify_dataset(s3_dataset)
    assert rep.ok and rep.n_samples == 60 and rep.n_shards == 3
    remote, local = inspect_dataset(s3_dataset), inspect_dataset(str(dataset))
    assert {k: v for k, v in remote.items() if k != "root"} == {k: v for k, v in local.items() if k != "root"}


@pytest.mark.slow
def test_s3_batch_stream_equals_local(s3_dataset, dataset, tmp_path):
    local = list(itertools.islice(make_stream(_cfg(str(dataset))), 5))
    remote = list(itertools.islice(make_stream(_cfg(s3_dataset, cache_dir=str(tmp_path / "c"))), 5))
    assert all(_same(a, b) for a, b in zip(local, remote, strict=True))
    assert any((tmp_path / "c").iterdir())


@pytest.mark.slow
def test_s3_missing_object_is_a_clear_error(s3_dataset):
    with pytest.raises(FileNotFoundError, match=r"s3://scd-test/nothing: not a shard dataset .*file not found"):
        ShardDataset("s3://scd-test/nothing")
    with pytest.raises(storage.FetchError, match=r"^s3://no-such-bucket-x/m.json: "):
        storage.read_bytes("s3://no-such-bucket-x/m.json")
