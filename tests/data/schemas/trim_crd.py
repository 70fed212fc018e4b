"""Make a small JSON Schema fixture from a Kubernetes CRD manifest (run by hand; see NOTICE).

    python tests/data/schemas/trim_crd.py CRD.yaml VERSION OUT.json --source "repo path@tag (commit)"

Keeps the ``openAPIV3Schema`` of one served version, drops ``description`` texts, and moves subtrees that
occur more than once (the pod template of every replica type) into ``$defs`` so each is stored once.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

MIN_SHARED = 2000  # characters of canonical JSON: smaller repeated subtrees stay inline


def _strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def _canon(node: Any) -> str:
    return json.dumps(node, sort_keys=True, separators=(",", ":"))


def _count(node: Any, counts: Counter[str]) -> None:
    if isinstance(node, dict):
        text = _canon(node)
        if len(text) >= MIN_SHARED:
            counts[text] += 1
        for v in node.values():
            _count(v, counts)
    elif isinstance(node, list):
        for v in node:
            _count(v, counts)


def _share(node: Any, names: dict[str, str]) -> Any:
    if isinstance(node, dict):
        name = names.get(_canon(node))
        if name is not None:
            return {"$ref": f"#/$defs/{name}"}
        return {k: _share(v, names) for k, v in node.items()}
    if isinstance(node, list):
        return [_share(v, names) for v in node]
    return node


def trim(crd: dict[str, Any], version: str, source: str) -> dict[str, Any]:
    """The trimmed schema of ``version`` of ``crd``, with shared subtrees in ``$defs``."""
    (ver,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = _strip(ver["schema"]["openAPIV3Schema"])
    counts: Counter[str] = Counter()
    _count(schema, counts)
    shared = sorted((t for t, n in counts.items() if n > 1), key=len, reverse=True)
    names: dict[str, str] = {}
    defs: dict[str, Any] = {}
    for i, text in enumerate(shared):  # largest first: a shared subtree inside another shared one stays inside
        if any(text in outer for outer in names):
            continue
        names[text] = f"shared{i}"
    for text, name in names.items():
        defs[name] = _share(json.loads(text), {t: n for t, n in names.items() if t != text})
    out = _share(schema, names)
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    return {"$comment": f"{kind} ({group}/{version}) from {source}; descriptions removed, repeated subtrees "
                        "in $defs (tests/data/schemas/trim_crd.py)", **out, "$defs": defs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("crd", type=Path)
    p.add_argument("version")
    p.add_argument("out", type=Path)
    p.add_argument("--source", required=True)
    a = p.parse_args()
    doc = trim(yaml.safe_load(a.crd.read_text()), a.version, a.source)
    a.out.write_text(json.dumps(doc, indent=0, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
