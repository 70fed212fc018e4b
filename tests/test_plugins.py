"""Plugin contract and registry: a third-party converter of a new domain, installed as an entry point."""
from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import EntryPoint
from pathlib import Path

import numpy as np
import pytest

from ingest.plugin import Converter, Reject, safe_convert
from ingest.registry import GROUP, PluginError, converter_for, discover, get_converter
from shards.format.schema import AtomGraph, make_key

ELEMENTS = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9, "S": 16}


@dataclass(frozen=True)
class PolymerOptions:
    """``min_atoms``: chains with fewer atoms are rejects."""

    min_atoms: int = 1


class PolymerConverter(Converter):
    """A tiny text format: ``chain NAME`` opens a record, then ``SYMBOL x y z`` lines."""

    name = "polymer"
    domain = "polymer"
    suffixes = (".poly",)
    default_source = "polymers"
    Options = PolymerOptions

    def _chains(self, path: Path) -> list[list[str]]:
        chains: list[list[str]] = []
        for line in path.read_text().splitlines():
            if line.startswith("chain "):
                chains.append([])
            elif line.strip():
                chains[-1].append(line)
        return chains

    def count_records(self, path: Path, options: PolymerOptions) -> int | None:
        return len(self._chains(path))

    def convert(self, path: Path, options: PolymerOptions, *, source: str, file_id: str,
                records: range | None = None) -> Iterator[AtomGraph | Reject]:
        chains = self._chains(path)
        for i in records if records is not None else range(len(chains)):
            rows = [line.split() for line in chains[i]]
            if len(rows) < options.min_atoms:
                yield self.reject(file_id, i, f"chain of {len(rows)} atoms is shorter than {options.min_atoms}")
                continue
            yield self.build(file_id, i, lambda rows=rows, i=i: AtomGraph(
                key=make_key(source, file_id, i), domain="polymer", source=source, source_file=file_id, index=i,
                atomic_numbers=np.array([ELEMENTS[r[0]] for r in rows]),
                positions=np.array([[float(v) for v in r[1:4]] for r in rows]), cell=np.zeros((3, 3)),
                pbc=np.zeros(3, bool)))


def _ep(name: str, value: str) -> EntryPoint:
    return EntryPoint(name=name, value=value, group=GROUP)


def _polyethylene(n: int) -> list[str]:
    return [f"C {1.27 * k:.3f} {0.42 * (k % 2):.3f} 0.0" for k in range(n)]


def test_third_party_plugin_ingests_into_shards(tmp_path: Path) -> None:
    from shards.format.manifest import write_dataset
    from shards.format.reader import ShardDataset

    installed = [_ep(n, f"{c.__module__}:{c.__name__}") for n, c in discover().items()]
    registry_eps = installed + [_ep("polymer", "tests.test_plugins:PolymerConverter")]
    path = tmp_path / "pe.poly"
    path.write_text("\n".join(["chain A", *_polyethylene(6), "chain B", *_polyethylene(2), "chain C",
                               "C 0 0 0", "Xx 1 1 1"]) + "\n")
    cls = converter_for(path, entry_points=registry_eps)
    assert cls is get_converter("polymer", entry_points=registry_eps) and cls.domain == "polymer"
    conv = cls()
    opts = conv.parse_options({"min_atoms": 3})
    items = list(safe_convert(conv, path, opts, source="pe", file_id=path.name))
    graphs = [g for g in items if isinstance(g, AtomGraph)]
    rejects = [r for r in items if isinstance(r, Reject)]
    assert len(items) == conv.count_records(path, opts) == 3
    assert [g.n_atoms for g in graphs] == [6] and {r.record for r in rejects} == {1, 2}
    assert all(r.reason and r.converter == "polymer" for r in rejects)
    write_dataset(graphs, tmp_path / "ds")
    back = list(ShardDataset(tmp_path / "ds"))
    assert len(back) == 1 and back[0].domain == "polymer" and back[0].equals(graphs[0])


def test_duplicate_names_are_errors_naming_both() -> None:
    eps = [_ep("sdf", "ingest.converters.molecules:SDFConverter"),
           _ep("sdf", "tests.test_plugins:PolymerConverter")]
    with pytest.raises(PluginError, match="sdf"):
        discover(eps)


def test_plugin_that_fails_to_import_is_named() -> None:
    with pytest.raises(PluginError, match=r"'broken'.*failed to import"):
        discover([_ep("broken", "no_such_module_xyz:Conv")])
    with pytest.raises(PluginError, match="'polymer'.*not a concrete"):
        discover([_ep("polymer", "tests.test_plugins:PolymerOptions")])
    with pytest.raises(PluginError, match="calls itself"):
        discover([_ep("poly2", "tests.test_plugins:PolymerConverter")])


def test_bad_options_name_the_converter() -> None:
    from shards.config import ConfigError

    with pytest.raises(ConfigError, match="polymer"):
        PolymerConverter().parse_options({"min_atomz": 2})


def test_cli_lists_name_domain_suffixes_version(capsys) -> None:
    from shards.tools.cli import main

    assert main(["ingest", "converters"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["name", "domain", "suffixes", "package"]
    rows = {line.split()[0]: line for line in out[1:]}
    assert set(rows) == set(discover())
    assert ".sdf" in rows["sdf"] and "molecule" in rows["sdf"] and "scd-atoms 0.1.0" in rows["sdf"]
    assert "crystal" in rows["cif"] and "md" in rows["mdanalysis"] and ".xtc" in rows["mdanalysis"]


def _claimants(path: Path, domain: str | None) -> list[str]:
    """Every installed converter (of ``domain``) whose own ``can_convert`` claims ``path``: sniffing's reference."""
    names = []
    for name, cls in sorted(discover().items()):
        conv = cls()
        if domain is not None and conv.output_domain(conv.parse_options({})) != domain:
            continue
        if conv.can_convert(path):
            names.append(name)
    return names


def test_sniffing_by_name_ending_matches_asking_every_converter(tmp_path: Path) -> None:
    """One Sniffer per domain remembers, per name ending, which converters a name rules out; asked about real files
    of every kind under their own and under altered names (twice each, so the remembered answer is used), it
    chooses exactly the converter that asking every converter finds, and refuses exactly when that is not one."""
    import MDAnalysisTests.datafiles as mda_files

    from ingest.registry import Sniffer
    from scd_train.datakit import package_dir, qm9_csv

    data = Path(mda_files.PDB_small).parent
    sources = [*sorted((Path(__file__).parent / "data" / "broken").glob("*.*")),
               package_dir("rdkit") / "Contrib/PBF/testData/egfr.sdf", Path(mda_files.PDB_small),
               data / "mmcif/3KPR.cif.gz", *sorted((package_dir("ase") / "test/testdata/minerals").glob("*.cif"))[:3],
               Path(mda_files.GRO), Path(mda_files.XTC), tmp_path / "qm9.csv"]
    with open(qm9_csv(1), "rb") as fh:  # the header and a few rows of the data kit's QM9 CSV
        sources[-1].write_bytes(b"".join(fh.readline() for _ in range(20)))
    files = []
    for i, src in enumerate(sources):
        for j, name in enumerate((src.name, src.name + ".bak", src.name.split(".")[0], src.name.upper(), "POSCAR")):
            dest = tmp_path / "files" / f"{i}-{j}" / name
            dest.parent.mkdir(parents=True)
            (shutil.copytree if src.is_dir() else shutil.copy)(src, dest)
            files.append(dest)
    decided = 0
    for domain in (None, "molecule", "protein", "crystal", "md"):
        sniff = Sniffer(domain)
        for path in files + files:
            want = _claimants(path, domain)
            if len(want) == 1:
                assert sniff(path).name == want[0], path
                decided += 1
            else:
                with pytest.raises(KeyError):
                    sniff(path)
    assert decided > len(files)  # the check covers real decisions, not only refusals
