"""Converter discovery through the ``scd.converters`` entry-point group (built-ins and plugins alike)."""
from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable, Mapping
from importlib import metadata
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

from ingest.plugin import Converter
from shards.config import ConfigError

GROUP = "scd.converters"


class PluginError(RuntimeError):
    """A converter plugin is broken; the message names it."""


def _load(eps: Iterable[EntryPoint]) -> dict[str, type[Converter]]:
    found: dict[str, type[Converter]] = {}
    origin: dict[str, str] = {}
    for ep in sorted(eps, key=lambda e: (e.name, e.value)):
        try:
            cls = ep.load()
        except Exception as exc:  # noqa: BLE001 - any import failure is reported with the plugin's name
            raise PluginError(f"converter plugin {ep.name!r} ({ep.value}) failed to import: "
                              f"{type(exc).__name__}: {exc}") from exc
        if not (inspect.isclass(cls) and issubclass(cls, Converter)) or inspect.isabstract(cls):
            raise PluginError(f"converter plugin {ep.name!r} ({ep.value}) is not a concrete ingest.plugin.Converter")
        for attr in ("name", "domain", "suffixes"):
            if not getattr(cls, attr, None):
                raise PluginError(f"converter plugin {ep.name!r} ({ep.value}) does not set {attr!r}")
        if cls.name != ep.name:
            raise PluginError(f"converter plugin {ep.name!r} ({ep.value}) calls itself {cls.name!r}")
        if ep.name in found:
            raise PluginError(f"duplicate converter name {ep.name!r}: {origin[ep.name]} and {ep.value}")
        found[ep.name], origin[ep.name] = cls, ep.value
    return found


@functools.lru_cache(maxsize=1)
def _installed() -> dict[str, type[Converter]]:
    return _load(metadata.entry_points(group=GROUP))


def discover(entry_points: Iterable[EntryPoint] | None = None) -> dict[str, type[Converter]]:
    """Every converter by name (cached per process); ``entry_points`` replaces the installed ones (tests)."""
    return _installed() if entry_points is None else _load(entry_points)


@functools.lru_cache(maxsize=1)
def _versions() -> dict[str, str]:
    out = {}
    for ep in metadata.entry_points(group=GROUP):
        dist = getattr(ep, "dist", None)
        out[ep.name] = f"{dist.name}=={dist.version}" if dist is not None else "unknown"
    return out


def converter_version(name: str) -> str:
    """``dist==version`` of the distribution that registers converter ``name`` (from its entry point; cheap,
    unlike scanning every installed distribution)."""
    return _versions().get(name, "unknown")


def _makes(conv: Converter, domain: str, options: Mapping[str, Any] | None) -> bool:
    """Whether ``conv`` makes samples of ``domain`` under ``options``."""
    try:
        return conv.output_domain(conv.parse_options(options or {})) == domain
    except ConfigError:
        return conv.domain == domain


@functools.lru_cache(maxsize=1)
def _probes() -> tuple[tuple[type[Converter], Converter], ...]:
    """One instance of every installed converter, for ``can_convert`` (cached: sniffing many small files)."""
    return tuple((c, c()) for c in _installed().values())


def get_converter(name: str, entry_points: Iterable[EntryPoint] | None = None) -> type[Converter]:
    """The converter class registered as ``name``."""
    convs = discover(entry_points)
    if name not in convs:
        raise KeyError(f"unknown converter {name!r}; installed: {sorted(convs)}")
    return convs[name]


def converter_for(path: Path, domain: str | None = None,
                  entry_points: Iterable[EntryPoint] | None = None,
                  options: Mapping[str, Any] | None = None) -> type[Converter]:
    """The one converter (of ``domain``, if given) that claims ``path``. A converter counts as of ``domain``
    when it makes that domain under the source's ``options`` (an XYZ converter with ``domain: md`` reads
    trajectories); options it does not accept leave its class's domain."""
    return Sniffer(domain, options, entry_points)(path)


_MAX_ENDINGS = 4096  # distinct name endings a Sniffer remembers (bounded memory)


class Sniffer:
    """``converter_for`` for the many files of one source: which converters make ``domain`` under ``options`` is
    decided once (parsing every converter's options per file cost more than reading a small file's head)."""

    def __init__(self, domain: str | None = None, options: Mapping[str, Any] | None = None,
                 entry_points: Iterable[EntryPoint] | None = None) -> None:
        self._domain = domain
        self._probes = _probes() if entry_points is None else tuple((c, c()) for c in discover(entry_points).values())
        # per converter: its suffixes when it claims by suffix alone (the base can_convert), else None (ask it)
        self._of_domain = tuple(
            (c, probe, tuple(probe.suffixes) if type(probe).can_convert is Converter.can_convert else None)
            for c, probe in self._probes if domain is None or _makes(probe, domain, options))
        # converters that never claim a name without one of their suffixes can be ruled out by the name's last
        # `_tail` characters alone: which of them remain is decided once per distinct ending, not per file
        self._gated = tuple((c, probe, tuple(probe.suffixes), suffixes is not None)
                            for c, probe, suffixes in self._of_domain if suffixes is not None or probe.suffix_gated)
        self._ungated = tuple((c, probe) for c, probe, suffixes in self._of_domain
                              if suffixes is None and not probe.suffix_gated)
        self._tail = max((len(x) for _, _, sfx, _ in self._gated for x in sfx), default=0)
        self._by_ending: dict[str, tuple[tuple[type[Converter], Converter, bool], ...]] = {}

    def __call__(self, path: Path | str) -> type[Converter]:
        p = path if isinstance(path, Path) else Path(path)
        low = p.name.lower()
        ending = low[-self._tail:] if self._tail else ""
        named = self._by_ending.get(ending)
        if named is None:
            named = tuple((c, probe, by_name) for c, probe, sfx, by_name in self._gated if ending.endswith(sfx))
            if len(self._by_ending) < _MAX_ENDINGS:
                self._by_ending[ending] = named
        matches = [c for c, probe, by_name in named if by_name or probe.can_convert(p)]
        matches += [c for c, probe in self._ungated if probe.can_convert(p)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            domain = self._domain
            what = f"no converter{'' if domain is None else f' of domain {domain!r}'} handles {path}"
            if p.is_dir():
                raise KeyError(f"{what}: it is a folder; give its files with a glob (e.g. {p / '*.cif'}), "
                               "or name a converter that reads folders (zarr_traj)")
            others = sorted(f"{c.name} (domain {c.domain})" for c, probe in self._probes if probe.can_convert(p))
            hint = f"; claimed by {', '.join(others)}" if others else ""
            raise KeyError(f"{what}{hint}; name one with converter: NAME (job file) or --converter NAME")
        raise KeyError(f"several converters handle {path}: {sorted(c.name for c in matches)}; name one")
