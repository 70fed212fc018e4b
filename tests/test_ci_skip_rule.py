"""The conftest CI rule: with CI set, a skip caused by a missing dependency of .[all] fails (module-level,
fixture and test skips alike); other skips, and every skip without CI, stay skips."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CASES = '''
import pytest


@pytest.fixture
def ray_like():
    pytest.skip("could not import 'ray': No module named 'ray'")


def test_fixture_skip_of_a_dependency(ray_like):
    pass


def test_explicit_missing_dependency():
    pytest.skip("missing dependency: moto[server] (no moto_server executable)")


def test_own_package_missing():
    pytest.skip("could not import 'scd_train.config': No module named 'scd_train.config'")


def test_module_not_in_all():
    pytest.importorskip("no_such_module_outside_the_extras")


def test_other_reason():
    pytest.skip("needs setsid (util-linux)")
'''
MODULE_LEVEL = '''
import pytest

pytest.skip("could not import 'ase': No module named 'ase'", allow_module_level=True)


def test_never_runs():
    pass
'''


def _run(folder: Path, ci: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                          "--continue-on-collection-errors",
                          str(folder)], capture_output=True, text=True, env=env, cwd=folder, timeout=120)
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ci_rule")
    shutil.copy(Path(__file__).with_name("conftest.py"), folder / "conftest.py")
    (folder / "test_cases.py").write_text(CASES)
    (folder / "test_module_skip.py").write_text(MODULE_LEVEL)
    return folder


def test_ci_turns_dependency_skips_into_failures(suite):
    summary = _run(suite, "true")
    # test-body skips fail; the fixture's and the module's are errors (setup, collection)
    assert "2 failed" in summary and "2 skipped" in summary and "2 errors" in summary, summary


def test_without_ci_they_stay_skips(suite):
    for ci in (None, ""):
        summary = _run(suite, ci)
        assert "6 skipped" in summary and "failed" not in summary and "error" not in summary, summary
