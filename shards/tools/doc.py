"""Generate the README's schema field table from ``FIELDS`` (``python -m shards.tools.doc --write``)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

from shards.format.schema import FIELDS, SCHEMA_VERSION_STR


def field_table() -> str:
    """The markdown table of schema fields, exactly as the README holds it."""
    rows = [f"Schema version {SCHEMA_VERSION_STR}.\n", "| field | dtype | shape | level | unit | required | meaning |",
            "|---|---|---|---|---|---|---|"]
    for f in FIELDS:
        shape = "[" + ", ".join(str(s) for s in f.shape) + "]" if f.shape else "scalar"
        rows.append(f"| `{f.name}` | {f.dtype} | {shape} | {f.level} | {f.unit or '-'} | "
                    f"{'yes' if f.required else 'no'} | {f.doc} |")
    return "\n".join(rows) + "\n"


def write_readme(path: Path) -> None:
    text = path.read_text()
    new = re.sub(r"(<!-- schema-table:start -->\n).*?(<!-- schema-table:end -->)",
                 lambda m: m.group(1) + field_table() + m.group(2), text, flags=re.S)
    path.write_text(new)


if __name__ == "__main__":
    if "--write" in sys.argv:
        write_readme(Path(__file__).parents[1] / "README.md")
    else:
        print(field_table(), end="")
