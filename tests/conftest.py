"""Shared fixtures: real structures from the data kit (packages installed with the project).

CI rule: when the environment variable ``CI`` is set (non-empty), a skip caused by a missing dependency
of ``pip install -e '.[all]'`` is reported as a failure. A skip counts as dependency-caused when its
reason is ``pytest.importorskip``'s ``could not import 'M'`` (or an import error ``No module named 'M'``)
for a module M that ``.[all]`` provides (a distribution it lists, or this project's own packages), or
when it starts with ``missing dependency: D`` with D such a distribution (for executables: ``moto_server``,
the ``ray`` CLI) or ``scd-atoms`` itself. Locally such tests still skip.
"""
from __future__ import annotations

import functools
import http.server
import os
import re
import threading
from importlib.metadata import PackageNotFoundError, requires
from pathlib import Path

import numpy as np
import pytest

from shards.format.schema import AtomGraph, make_key


@functools.lru_cache(maxsize=1)
def _real_graphs() -> tuple[AtomGraph, ...]:
    from ase.collections import g2
    from MDAnalysisTests.datafiles import PDB_small as ADK_PDB  # adk_open.pdb
    from pymatgen.core import Structure

    out = []
    for i, atoms in enumerate(g2):
        out.append(AtomGraph.from_ase(atoms, key=make_key("g2", "ase.collections.g2", i), domain="molecule",
                                      source="g2", source_file="ase.collections.g2", index=i))
    import pymatgen.util as pu

    sdir = Path(pu.__file__).parent / "structures"
    for path in sorted(sdir.glob("*.json")):
        s = Structure.from_file(path)
        if s.is_ordered:
            out.append(AtomGraph.from_pymatgen(s, key=make_key("pmg", path.name, 0), domain="crystal",
                                               source="pymatgen", source_file=path.name, index=0))
    out.append(_adk_protein(ADK_PDB))
    return tuple(out)


def _element(atom) -> str:
    el = atom.element.capitalize()
    return el if el not in ("", "X") else atom.get_name().lstrip("0123456789")[0]


def _adk_protein(path: str) -> AtomGraph:
    from ase.data import atomic_numbers
    from Bio.PDB import PDBParser

    atoms = list(PDBParser(QUIET=True).get_structure("adk", path)[0].get_atoms())
    res = [a.get_parent() for a in atoms]
    return AtomGraph(
        key=make_key("adk", "adk_open.pdb", 0), domain="protein", source="adk", source_file="adk_open.pdb",
        index=0, atomic_numbers=[atomic_numbers[_element(a)] for a in atoms],
        positions=np.array([a.coord for a in atoms]), cell=np.zeros((3, 3)), pbc=np.zeros(3, bool),
        atom_name=[a.get_name()[:4] for a in atoms], residue_index=[r.id[1] for r in res],
        residue_name=[r.get_resname()[:4] for r in res], chain=[r.get_parent().id for r in res],
        hetero=[r.id[0] != " " for r in res])


@pytest.fixture(scope="session")
def real_graphs() -> tuple[AtomGraph, ...]:
    """~180 real structures: ASE g2 molecules, pymatgen's ordered crystals, the adk protein (3,341 atoms)."""
    return _real_graphs()


class Served(tuple):
    """(base URL, folder) of a test http server; ``gets`` lists the paths of the GET requests it answered."""

    gets: list[str]


@pytest.fixture()
def http_root(tmp_path: Path):
    """Serve ``tmp_path`` over http on 127.0.0.1; yields (base_url, folder), a :class:`Served`."""
    gets: list[str] = []

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(tmp_path), **k)

        def do_GET(self):
            gets.append(self.path)
            super().do_GET()

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    served = Served((f"http://127.0.0.1:{server.server_address[1]}", tmp_path))
    served.gets = gets
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------------- the CI skip rule
PROJECT = "scd-atoms"
OWN_PACKAGES = ("shards", "ingest", "scd_train")
# import name -> distribution, where they differ beyond case and -/_/.
IMPORT_ALIASES = {"bio": "biopython", "yaml": "pyyaml"}
_MISSING = re.compile(r"could not import '(?P<module>[\w.]+)'|No module named '(?P<nomod>[\w.]+)'"
                      r"|^(?:Skipped: )?missing dependency: (?P<dist>[\w.\-]+)")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


@functools.lru_cache(maxsize=1)
def all_extra_distributions() -> frozenset[str]:
    """Normalised names of every distribution ``.[all]`` installs (self-referencing extras resolved)."""
    try:
        reqs = requires(PROJECT) or []
    except PackageNotFoundError:  # not installed: everything it would provide is missing
        reqs = []
    by_extra: dict[str | None, list[str]] = {}
    for req in reqs:
        name = re.match(r"[A-Za-z0-9._-]+", req).group(0)  # type: ignore[union-attr]
        extras = re.search(r"\[([^\]]*)\]", req.split(";")[0])
        marker = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", req)
        by_extra.setdefault(marker.group(1) if marker else None, []).append(
            f"{name}[{extras.group(1)}]" if extras and _norm(name) == _norm(PROJECT) else name)
    names: set[str] = set()
    todo, done = [None, "all"], set()
    while todo:
        extra = todo.pop()
        if extra in done:
            continue
        done.add(extra)
        for req in by_extra.get(extra, []):
            if _norm(req.split("[")[0]) == _norm(PROJECT):
                todo += [e.strip() for e in req.split("[")[1].rstrip("]").split(",")]
            else:
                names.add(_norm(req))
    return frozenset(names | {_norm(PROJECT)})


def dependency_of_all(reason: str) -> str | None:
    """The module or distribution of ``.[all]`` whose absence the skip ``reason`` reports, else None."""
    m = _MISSING.search(reason)
    if m is None:
        return None
    if m.group("dist"):
        dist = m.group("dist")
        return dist if _norm(dist) in all_extra_distributions() else None
    module = m.group("module") or m.group("nomod")
    top = module.split(".")[0]
    if top in OWN_PACKAGES or _norm(IMPORT_ALIASES.get(top.lower(), top)) in all_extra_distributions():
        return module
    return None


def _fail_dependency_skip(report: pytest.CollectReport | pytest.TestReport) -> None:
    if not os.environ.get("CI") or not report.skipped:
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    missing = dependency_of_all(reason)
    if missing is not None:
        report.outcome = "failed"
        report.longrepr = (f"CI is set and a dependency of .[all] is missing ({missing}), so this skip is a "
                           f"failure: {reason}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> pytest.TestReport:
    report = yield
    _fail_dependency_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> pytest.CollectReport:
    report = yield
    _fail_dependency_skip(report)
    return report
