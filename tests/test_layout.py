"""Module boundaries: ingest -> shards <- scd_train, checked by parsing every import of every module.

Covered: absolute and relative imports, imports inside functions, ``importlib.import_module("...")``;
the layers inside ``shards`` (format <- stream <- tools) and the leaf ``scd_train.models``; private names
used across modules; the entry points of the CLI and the converters; and runtime launches (``-m MODULE``
in a command line), which may only start the documented commands.
"""
from __future__ import annotations

import ast
import functools
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PYPROJECT = (ROOT / "pyproject.toml").read_text()
TOP = ("ingest", "shards", "scd_train")
# top-level package -> third-party or sibling packages it may not import
FORBIDDEN = {
    "shards": {"ingest", "scd_train", "torch", "ray"},
    "ingest": {"scd_train", "torch"},
    "scd_train": {"ingest", "ray"},
}
# module prefix -> project module prefixes it may not import (the layers inside a package)
INNER = {
    "shards.format": ("shards.stream", "shards.tools"),
    "shards.stream": ("shards.tools",),
    "shards.config": ("shards.format", "shards.stream", "shards.tools"),
    "shards.progress": ("shards.format", "shards.stream", "shards.tools"),
    "scd_train.models": tuple(f"scd_train.{m.stem}" for m in (ROOT / "scd_train").glob("*.py")),
}
# what a command line in the code may start with ``-m`` besides modules of its own package: the ``scd`` CLI
# (``python -m shards``, and ``torchrun ... -m scd_train`` for training) and torchrun itself
LAUNCHABLE = {"shards", "scd_train", "torch.distributed.run"}


def toml_table(header: str) -> dict[str, str]:
    """``key = "value"`` lines of one pyproject table (tomllib is not in Python 3.10)."""
    body = PYPROJECT.split(f"[{header}]\n", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^([\w.-]+)\s*=\s*"([^"]*)"', body, re.M))


@functools.cache
def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_files() -> list[Path]:
    return sorted(p for top in TOP for p in (ROOT / top).rglob("*.py"))


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports (relative imports resolved; ``from a import b`` gives ``a`` and ``a.b``)."""
    tree = parse(path)
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[:len(package) - node.level + 1], *([base] if base else [])])
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            out.add(node.args[0].value)
    return {m for m in out if m}


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_every_package_is_covered():
    """The packages the distribution ships are exactly the ones checked here, each with a package face."""
    section = PYPROJECT.split("[tool.setuptools.packages.find]\n", 1)[1].split("\n[", 1)[0]
    include = re.search(r"^include\s*=\s*\[([^\]]*)\]", section, re.M)
    assert include is not None and sorted(re.findall(r'"([^"]+)"', include.group(1))) == sorted(f"{t}*" for t in TOP)
    assert set(FORBIDDEN) == set(TOP)
    for folder in sorted({p.parent for p in package_files()}):
        if folder.name != "__pycache__":
            assert (folder / "__init__.py").is_file(), f"{folder.relative_to(ROOT)} has no __init__.py"
    subpackages = {module_name(p.parent / "__init__.py") for p in package_files()}
    assert {"shards.format", "shards.stream", "shards.tools", "scd_train.models", "ingest.converters"} <= subpackages


@pytest.mark.parametrize("package", TOP)
def test_dependency_direction(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        hits = {m.split(".")[0] for m in imported(path)} & FORBIDDEN[package]
        if hits:
            bad.append(f"{path.relative_to(ROOT)} imports {sorted(hits)}")
    assert not bad, "\n".join(bad)


def test_layers_inside_packages():
    """shards.format imports neither the stream nor the tools, the stream not the tools, config/progress
    nothing of shards, and the backbones (scd_train.models) nothing of the trainer."""
    bad = []
    for path in package_files():
        name = module_name(path)
        for prefix, banned in INNER.items():
            if _within(name, prefix):
                hits = sorted(m for m in imported(path) for b in banned if _within(m, b) and not _within(m, prefix))
                if hits:
                    bad.append(f"{path.relative_to(ROOT)} imports {hits}")
    assert not bad, "\n".join(bad)


def test_resolver_sees_relative_and_lazy_imports(tmp_path, monkeypatch):
    """The checker itself: relative, function-local and importlib imports are all seen."""
    pkg = tmp_path / "shards" / "format"
    pkg.mkdir(parents=True)
    src = pkg / "bad.py"
    src.write_text("from ..stream import loader\ndef f():\n    import torch\n"
                   "    import importlib\n    importlib.import_module('scd_train.views')\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert {"shards.stream", "shards.stream.loader", "torch", "scd_train.views"} <= imported(src)


def _private_uses(path: Path) -> list[str]:
    """``from project.module import _name`` and ``alias._name`` where ``alias`` is a project module."""
    tree = parse(path)
    aliases: set[str] = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] in TOP):
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}.{a.name}")
                elif (ROOT / Path(*(node.module or "").split("."), a.name)).with_suffix(".py").is_file():
                    aliases.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.asname and a.name.split(".")[0] in TOP}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {node.value.id}.{node.attr}")
    return found


def test_no_private_names_across_modules():
    files = [*package_files(), *(p for d in ("benchmarks", "tools", "tests") for p in sorted((ROOT / d).glob("*.py")))]
    bad = [hit for path in files for hit in _private_uses(path)]
    assert not bad, "\n".join(bad)


def test_entry_points_stay_in_their_layer():
    """Command groups live in each package's own CLI module (the ``scd`` core finds them, it imports none);
    converters are ingest's; every entry point names an importable module path of this repository."""
    commands = toml_table('project.entry-points."scd.commands"')
    converters = toml_table('project.entry-points."scd.converters"')
    assert set(commands.values()) >= {"ingest.cli:register", "scd_train.cli:register"}
    for name, target in commands.items():
        assert target.endswith(":register") and target.split(".")[0] in TOP, (name, target)
    assert len(converters) >= 10
    for name, target in converters.items():
        assert _within(target.split(":")[0], "ingest.converters"), (name, target)
    for target in [*commands.values(), *converters.values()]:
        module = target.split(":")[0]
        assert (ROOT / Path(*module.split("."))).with_suffix(".py").is_file(), target
    script = toml_table("project.scripts")["scd"].split(":")[0]
    assert _within(script, "shards.tools"), script
    assert {m.split(".")[0] for m in imported((ROOT / Path(*script.split("."))).with_suffix(".py"))} \
        .isdisjoint({"ingest", "scd_train"})


def test_trainer_names_no_converter():
    """The ingest jobs scd_train writes (demo, studies) leave the converter to the registry (``auto``): a
    converter name in scd_train would tie the trainer to one plugin."""
    bad = []
    for path in sorted((ROOT / "scd_train").rglob("*.py")):
        for node in ast.walk(parse(path)):
            if isinstance(node, ast.Dict):
                for k, v in zip(node.keys, node.values, strict=True):
                    if (isinstance(k, ast.Constant) and k.value == "converter"
                            and not (isinstance(v, ast.Constant) and v.value == "auto")):
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno} names converter {ast.unparse(v)}")
    assert not bad, "\n".join(bad)


LAUNCH_RE = re.compile(r"(?:^|\s)-m\s+([A-Za-z_][\w.]*)")


def launches(path: Path) -> list[tuple[int, str]]:
    """Modules a file starts with ``-m MODULE``: in argv lists/tuples and in command strings."""
    tree = parse(path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.List, ast.Tuple)):
            items = node.elts
            for a, b in zip(items, items[1:], strict=False):  # pairs of neighbours: lengths differ by design
                if isinstance(a, ast.Constant) and a.value == "-m" and isinstance(b, ast.Constant) \
                        and isinstance(b.value, str):
                    out.append((node.lineno, b.value))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            out += [(node.lineno, m) for m in LAUNCH_RE.findall(node.value)]
    return out


def test_runtime_launches_go_through_the_documented_commands():
    """A child process started by the code (or a command its docstrings document) runs the ``scd`` CLI,
    torchrun or a module of its own package, and that module exists: never a module of another layer
    (``-m ingest.run`` from scd_train would carry Ray into the trainer's process tree unseen) nor a stale
    internal path (``-m shards.cli`` after a move)."""
    bad, seen = [], set()
    for path in package_files():
        own = module_name(path).split(".")[0]
        for line, module in launches(path):
            seen.add(module)
            top = module.split(".")[0]
            if module not in LAUNCHABLE and top != own:
                bad.append(f"{path.relative_to(ROOT)}:{line} launches -m {module} (not a documented command)")
            elif top in TOP and not any(f.is_file() for f in (ROOT / f"{module.replace('.', '/')}.py",
                                                              ROOT / module.replace(".", "/") / "__main__.py")):
                bad.append(f"{path.relative_to(ROOT)}:{line} launches -m {module}, which does not exist")
    assert not bad, "\n".join(bad)
    assert {"shards", "torch.distributed.run"} <= seen  # the scanner finds the launcher's own command lines


def test_launch_scanner_sees_lists_and_strings(tmp_path):
    src = tmp_path / "x.py"
    src.write_text("cmd = [sys.executable, '-m', 'ingest.run', job]\nsh = 'python -m shards.cli ingest run j.yaml'\n")
    assert sorted(m for _, m in launches(src)) == ["ingest.run", "shards.cli"]


def test_cli_help_for_every_subcommand(capsys):
    """``python -m shards --help`` (the ``scd`` console script without PATH) lists every command group of the
    entry points; each subcommand answers ``--help``."""
    from shards.tools.cli import main

    out = subprocess.run([sys.executable, "-m", "shards", "--help"], capture_output=True, text=True, check=True)
    for group in toml_table('project.entry-points."scd.commands"'):
        assert group in out.stdout, group
    for cmd in (["shards"], ["shards", "verify"], ["shards", "inspect"], ["shards", "export"], ["ingest", "run"],
                ["ingest", "converters"], ["train"], ["demo"], ["finetune"], ["study"]):
        with pytest.raises(SystemExit) as exit_:
            main([*cmd, "--help"])
        assert exit_.value.code == 0 and len(capsys.readouterr().out) > 100, cmd
