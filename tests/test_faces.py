"""Package faces: every public name each package exports resolves, is the module's own object, and the face
has a docstring; the trainer's face is lazy (importing it loads no model code)."""
from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

FACES = ["shards", "shards.format", "shards.stream", "shards.tools", "ingest", "scd_train", "scd_train.models"]


@pytest.mark.parametrize("package", FACES)
def test_every_exported_name_resolves(package):
    mod = importlib.import_module(package)
    assert mod.__doc__ and len(mod.__doc__.split()) >= 10, f"{package} needs a one-paragraph docstring"
    names = getattr(mod, "__all__", None)
    assert names, f"{package} exports nothing"
    assert len(set(names)) == len(names), f"{package}.__all__ repeats a name"
    for name in names:
        obj = getattr(mod, name)
        home = getattr(obj, "__module__", None)
        if home and home.startswith(package.split(".")[0]):
            assert getattr(importlib.import_module(home), name, obj) is obj, f"{package}.{name} is not {home}.{name}"


def test_unknown_name_is_an_attribute_error():
    import scd_train

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        scd_train.nope  # noqa: B018


def test_trainer_face_is_lazy():
    code = "import sys, scd_train, scd_train.views; print('torch' in sys.modules, 'scd_train.trainer' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"], "importing the face or the views must not load torch or the trainer"
