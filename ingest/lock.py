"""An exclusive lock on an ingest output folder, and the removal of temporary files left in it.

The lock is an ``flock`` on ``<out>/.ingest.lock``, which the kernel releases when its holder dies (also
on SIGKILL). The holder writes its pid, host and start time into the file and empties it on a clean exit;
a non-empty file whose lock is free was left by a process that died: a stale lock, reported and taken over.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOCK_FILE = ".ingest.lock"
TEMP_PATTERNS = (".*.tmp-*", ".*.tmp")


class LockedError(RuntimeError):
    """Another live process holds the output folder."""


def _holder(text: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _describe(info: dict[str, Any]) -> str:
    if not info:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(info.get("started", 0))))
    return f"pid {info.get('pid')} on {info.get('host')} (since {since})"


@contextlib.contextmanager
def output_lock(out: Path, *, log: Any = None) -> Iterator[None]:
    """Hold the exclusive lock of ``out`` for the duration; a second holder gets :class:`LockedError`."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    path = out / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _holder(os.pread(fd, 4096, 0).decode(errors="replace"))
            raise LockedError(f"{out}: another ingest job ({_describe(info)}) is writing this folder; wait for it "
                              f"to finish or stop it") from None
        stale = _holder(os.pread(fd, 4096, 0).decode(errors="replace"))
        if stale:
            log(f"{out}: taking over a stale lock of {_describe(stale)}, which is no longer running")
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": round(time.time(), 3)})
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def remove_temp_files(*folders: Path) -> list[Path]:
    """Delete temporary files (``.NAME.tmp-PID``, ``.NAME.tmp``) in ``folders``; call only under the lock."""
    import shutil

    removed = []
    for folder in folders:
        for pattern in TEMP_PATTERNS:
            for p in folder.glob(pattern):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
    return removed
