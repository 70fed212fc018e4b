"""The converter plugin contract: every input record becomes a sample or a reject with a reason."""
from __future__ import annotations

import abc
import io
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar

import numpy as np

from shards.config import ConfigError, from_dict
from shards.format.schema import AtomGraph, SchemaError

MAX_FILE_BYTES = 8 * 1024 ** 3


def owned(a: Any, dtype: Any) -> np.ndarray:
    """``a`` as a C-contiguous, read-only array of ``dtype``, which the schema validator keeps without a
    copy. Only for arrays no one else holds (a fresh parse result, or per-file arrays shared by frames)."""
    arr = np.ascontiguousarray(a, dtype=dtype)
    arr.flags.writeable = False
    return arr


def read_head(path: Path, n: int) -> bytes:
    """The first ``n`` bytes of a file (decompressed when it ends in .gz); empty when unreadable."""
    import gzip

    try:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rb") as fh:
            return fh.read(n)
    except OSError:
        return b""


RATIO_FLOOR_BYTES = 32 * 1024 ** 2


@dataclass(frozen=True)
class InputBounds:
    """Bounds on the decompressed bytes of a compressed input (base of converter options): at most
    ``max_decompressed_bytes``, and at most ``max_compression_ratio`` times the compressed size once more than
    32 MiB are out (real structure files compress 3-20x; a decompression bomb 100-1000x)."""

    max_decompressed_bytes: int = 16 * 1024 ** 3
    max_compression_ratio: float = 50.0

    def __post_init__(self) -> None:
        if self.max_decompressed_bytes < 1 or not self.max_compression_ratio >= 1:
            raise ValueError("max_decompressed_bytes must be >= 1 and max_compression_ratio >= 1")

    def limit(self, compressed_bytes: int) -> int:
        """Decompressed bytes allowed for a compressed file of ``compressed_bytes``."""
        by_ratio = max(RATIO_FLOOR_BYTES, int(self.max_compression_ratio * compressed_bytes))
        return min(self.max_decompressed_bytes, by_ratio)


class InputTooLarge(ValueError):
    """A compressed input decompresses to more bytes than its bound allows."""


class _Bounded(io.RawIOBase):
    """A read-only stream that raises :class:`InputTooLarge` as soon as more than ``limit`` bytes came out."""

    def __init__(self, raw: io.BufferedIOBase, limit: int, name: str) -> None:
        self._raw, self._limit, self._name, self._seen = raw, limit, name, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self._raw.readinto(b)
        self._seen += n
        if self._seen > self._limit:
            raise InputTooLarge(f"{self._name} decompresses to more than {self._limit} bytes "
                                "(max_decompressed_bytes / max_compression_ratio)")
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def is_compressed(path: Path) -> bool:
    return path.name.lower().endswith(".gz")


def open_input(path: Path, bounds: Any = None, *, text: bool = False) -> IO[Any]:
    """Open an input file for reading, transparently decompressing ``.gz``; decompressed bytes are counted as
    they are read and bounded by ``bounds`` (an :class:`InputBounds`, or options deriving from it; defaults
    otherwise), so memory stays bounded however a reader consumes the stream. ``text``: UTF-8 with undecodable
    bytes replaced."""
    import gzip

    if not is_compressed(path):
        return open(path, encoding="utf-8", errors="replace") if text else open(path, "rb")
    b = bounds if isinstance(bounds, InputBounds) else InputBounds()
    raw = _Bounded(gzip.open(path, "rb"), b.limit(path.stat().st_size), path.name)  # noqa: SIM115
    stream = io.BufferedReader(raw, 1 << 16)
    return io.TextIOWrapper(stream, encoding="utf-8", errors="replace") if text else stream


@dataclass(frozen=True)
class Reject:
    """A record that did not become a sample, and why."""

    file: str
    record: int | None
    converter: str
    reason: str


@dataclass(frozen=True)
class NoOptions:
    """A converter without options."""


class Converter(abc.ABC):
    """Turn one input file into :class:`AtomGraph` records (and :class:`Reject` entries).

    Subclasses set ``name``, ``domain``, ``suffixes``, ``default_source`` and ``Options`` (a frozen
    dataclass, all fields defaulted) and implement :meth:`convert`. ``convert`` yields exactly one item
    per record of ``records`` (all records when ``None``); record indices are positions in the file.
    Heavy libraries are imported inside methods, never at module import.
    """

    name: ClassVar[str]
    domain: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]]
    default_source: ClassVar[str] = "data"
    Options: ClassVar[type] = NoOptions
    #: True when an overridden :meth:`can_convert` never claims a file whose name lacks one of ``suffixes`` (then
    #: sniffing rules it out by name, without calling it); the base :meth:`can_convert` is suffix-only anyway
    suffix_gated: ClassVar[bool] = False

    def can_convert(self, path: Path) -> bool:
        return path.name.lower().endswith(tuple(self.suffixes))

    def parse_options(self, data: Mapping[str, Any] | None) -> Any:
        if isinstance(data, self.Options):
            return data
        return from_dict(self.Options, dict(data or {}), where=f"converter {self.name} options")

    def count_records(self, path: Path, options: Any) -> int | None:
        """Cheap record count for splitting a large file into ranges; None when not splittable."""
        return None

    def output_domain(self, options: Any) -> str:
        """The domain of the samples made under ``options``: an option ``domain`` other than ``auto`` fixes it
        (XYZ frames read as ``md``), else the class's ``domain`` (with ``auto``, each sample's own domain
        counts; the accounting takes accepted samples by their domain)."""
        fixed = getattr(options, "domain", None)
        return fixed if isinstance(fixed, str) and fixed != "auto" else self.domain

    @abc.abstractmethod
    def convert(self, path: Path, options: Any, *, source: str, file_id: str,
                records: range | None = None) -> Iterator[AtomGraph | Reject]:
        """Yield one sample or reject per record."""

    def reject(self, file_id: str, record: int | None, reason: str) -> Reject:
        return Reject(file_id, record, self.name, reason)

    def build(self, file_id: str, record: int, make: Any) -> AtomGraph | Reject:
        """``make()`` -> AtomGraph, with schema and parse errors turned into a reject of this record."""
        try:
            return make()
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            return self.refusal(file_id, record, exc)

    def refusal(self, file_id: str, record: int, exc: Exception) -> Reject:
        """The reject of a record whose construction raised ``exc`` (a schema, parse or lookup error)."""
        if isinstance(exc, SchemaError):
            return self.reject(file_id, record, f"invalid record: {exc.field}: {exc.reason}")
        if isinstance(exc, ValueError):
            return self.reject(file_id, record, str(exc)[:300])
        return self.reject(file_id, record, f"unreadable record: {type(exc).__name__}: {str(exc)[:300]}")


def safe_convert(conv: Converter, path: Path, options: Any, *, source: str, file_id: str,
                 records: range | None = None, max_file_bytes: int = MAX_FILE_BYTES,
                 max_atoms: int | None = None) -> Iterator[AtomGraph | Reject]:
    """Run a converter so that nothing is lost: a file that cannot be read at all becomes one reject with
    record None; an exception mid-file becomes a reject for every record not yet yielded (the rest of
    ``records``, or of the counted file); records of ``records`` past the end of the file are rejects too.
    Duplicates and records outside ``records`` are dropped, so each wanted record appears exactly once.
    Files over ``max_file_bytes`` are one reject; samples over ``max_atoms`` atoms are rejects of their record."""
    try:
        st = path.stat()
        size = st.st_size if stat.S_ISREG(st.st_mode) else \
            sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    except OSError as exc:
        yield conv.reject(file_id, None, f"cannot open: {exc.strerror or exc}")
        return
    if size > max_file_bytes:
        yield conv.reject(file_id, None, f"file of {size} bytes exceeds the {max_file_bytes}-byte limit")
        return
    done: set[int] = set()
    add, top = done.add, -1  # top: the highest index yielded so far, so a higher one is not a duplicate
    lo, hi = (0, -1) if records is None or records.step != 1 else (records.start, records.stop)
    try:
        for item in conv.convert(path, options, source=source, file_id=file_id, records=records):
            if type(item) is AtomGraph:  # the common case (a sample after the last one, wanted), with less work
                idx = item.index
                if idx > top and (records is None or lo <= idx < hi) and (
                        max_atoms is None or item.atomic_numbers.shape[0] <= max_atoms):
                    top = idx
                    add(idx)
                    yield item
                    continue
            if isinstance(item, Reject):
                if item.record is None:
                    yield item
                    return
                idx = item.record
            else:
                idx = item.index
            if idx in done or (records is not None and idx not in records):
                continue
            add(idx)
            top = max(top, idx)
            if max_atoms is not None and isinstance(item, AtomGraph) and item.n_atoms > max_atoms:
                item = conv.reject(file_id, idx, f"{item.n_atoms} atoms exceed the limit of {max_atoms}")
            yield item
    except (ConfigError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - a broken file must not stop the job; the reason is kept
        too_large = _input_too_large(exc)
        reason = str(too_large)[:300] if too_large else f"unreadable file: {type(exc).__name__}: {str(exc)[:300]}"
        if records is None and not done:
            yield conv.reject(file_id, None, reason)
            return
        yield from _fill(conv, path, options, file_id, records, done, reason)
        return
    if records is not None:
        yield from _fill(conv, path, options, file_id, records, done, "record beyond the end of the file")


def _input_too_large(exc: BaseException) -> InputTooLarge | None:
    """The :class:`InputTooLarge` behind ``exc``, also when a parser wrapped it (RDKit raises SystemError)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None or isinstance(seen, InputTooLarge):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _fill(conv: Converter, path: Path, options: Any, file_id: str, records: range | None, done: set[int],
          reason: str) -> Iterator[Reject]:
    """Rejects for the records of ``records`` (or of the whole countable file) that yielded nothing."""
    if records is None:
        try:
            n = conv.count_records(path, options)
        except Exception:  # noqa: BLE001 - the file is already known to be broken
            n = None
        records = range(n) if n is not None and n > max(done) else range(max(done) + 1, max(done) + 2)
    for r in records:
        if r not in done:
            yield conv.reject(file_id, r, reason)
