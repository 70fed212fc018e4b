"""``scd shards report``: a data report with pictures (PNG plots and one HTML page)."""
from __future__ import annotations

import argparse
import html
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from shards.format import storage
from shards.format.audit import inspect_dataset
from shards.format.reader import ShardDataset

ELEMENT_SAMPLE_LIMIT = 200_000


def add_parser(sub: Any) -> None:
    p = sub.add_parser("report", help="write a data report (PNG plots + index.html)",
                       description="Samples and atoms per domain and source, the distribution of atoms per "
                                   "sample, element frequencies and rejects by reason, as PNGs and one HTML page.")
    p.add_argument("dataset")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--max-samples", type=int, default=ELEMENT_SAMPLE_LIMIT,
                   help="samples decoded for element frequencies (evenly spread over the dataset)")
    p.set_defaults(func=run)


def _elements(ds: ShardDataset, limit: int) -> Counter:
    counts: Counter = Counter()
    total = len(ds)
    stride = max(1, total // max(limit, 1))
    i = 0
    for name in ds.shard_names:
        n = len(ds.shard_index(name)["key"])
        rows = [r for r in range(n) if (i + r) % stride == 0]
        i += n
        for g in ds.iter_shard(name, rows=rows):
            zs, cs = np.unique(g.atomic_numbers, return_counts=True)
            counts.update(dict(zip(zs.tolist(), cs.tolist(), strict=True)))
    return counts


def _rejects(root: str) -> Counter:
    """Rejects by reason from the ingest job's ``rejects.jsonl`` beside the dataset (a folder or a URL)."""
    location = storage.join(root, "rejects.jsonl")
    reasons: Counter = Counter()
    if storage.exists(location):
        for line in storage.read_bytes(location).decode().splitlines():
            if line.strip():
                reasons[json.loads(line)["reason"].split(":")[0][:60]] += 1
    return reasons


def write_report(dataset: str, out: Path, max_samples: int = ELEMENT_SAMPLE_LIMIT) -> Path:
    """Write the PNGs and ``index.html`` into ``out``; returns the HTML path."""
    from shards.tools.plot import pyplot

    plt = pyplot()
    from ase.data import chemical_symbols

    out.mkdir(parents=True, exist_ok=True)
    ds = ShardDataset(dataset)
    info = inspect_dataset(dataset)
    cols = ds.columns(("n_atoms", "domain"))
    n_atoms = cols["n_atoms"]
    dom_codes, dom_names = cols["domain"], ds.domain_names
    figs: list[tuple[str, str]] = []

    def save(fig: Any, name: str, title: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        figs.append((name, title))

    for kind in ("domains", "sources"):
        names = list(info[kind])
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        axes[0].bar(names, [info[kind][n]["samples"] for n in names], color="tab:blue")
        axes[0].set_ylabel("samples")
        axes[1].bar(names, [info[kind][n]["atoms"] for n in names], color="tab:orange")
        axes[1].set_ylabel("atoms")
        for ax in axes:
            ax.tick_params(axis="x", rotation=30)
        save(fig, f"{kind}.png", f"Samples and atoms per {kind[:-1]}")
    fig, ax = plt.subplots(figsize=(8, 3.5))
    bins = np.logspace(0, np.log10(max(int(n_atoms.max()), 2)) + 0.05, 40)
    for code, name in enumerate(dom_names):
        sel = n_atoms[dom_codes == code]
        if sel.size:
            ax.hist(sel, bins=list(bins), alpha=0.6, label=f"{name} (n={sel.size})")
    ax.set_xscale("log")
    ax.set_xlabel("atoms per sample")
    ax.set_ylabel("samples")
    ax.legend()
    save(fig, "atoms_per_sample.png", "Distribution of atoms per sample")
    elements = _elements(ds, max_samples)
    top = elements.most_common(30)
    fig, ax = plt.subplots(figsize=(10, 3.5))
    ax.bar([chemical_symbols[int(z)] for z, _ in top], [c for _, c in top], color="tab:green")
    ax.set_yscale("log")
    ax.set_ylabel("atoms")
    save(fig, "elements.png", "Element frequencies (30 most common)")
    reasons = _rejects(dataset)
    if reasons:
        fig, ax = plt.subplots(figsize=(10, 0.4 * len(reasons) + 1.5))
        items = reasons.most_common(20)
        ax.barh([r for r, _ in items][::-1], [c for _, c in items][::-1], color="tab:red")
        ax.set_xlabel("rejected records")
        save(fig, "rejects.png", "Rejects by reason")
    page = out / "index.html"
    page.write_text(_html(dataset, info, figs, reasons))
    return page


def _html(dataset: str, info: dict[str, Any], figs: list[tuple[str, str]], reasons: Counter) -> str:
    rows = "".join(f"<tr><td>{html.escape(k[:-1])}</td><td>{html.escape(n)}</td><td>{s['samples']}</td>"
                   f"<td>{s['atoms']}</td><td>{s['min_atoms']}</td><td>{s['median_atoms']:.0f}</td>"
                   f"<td>{s['max_atoms']}</td></tr>"
                   for k in ("domains", "sources") for n, s in info[k].items())
    imgs = "".join(f"<h2>{html.escape(t)}</h2><img src='{n}'>" for n, t in figs)
    rej = f"<p>{sum(reasons.values())} rejected records.</p>" if reasons else "<p>No rejects recorded.</p>"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Data report</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:auto}td,th{padding:2px 10px;text-align:right}"
            f"</style></head><body><h1>Data report: {html.escape(dataset)}</h1>"
            f"<p>{info['samples']} samples in {info['shards']} shards, {info['bytes'] / 1e6:.1f} MB, "
            f"schema {info['schema_version']}.</p>{rej}<table><tr><th>kind</th><th>name</th><th>samples</th>"
            f"<th>atoms</th><th>min</th><th>median</th><th>max</th></tr>{rows}</table>{imgs}</body></html>")


def run(args: argparse.Namespace) -> int:
    print(write_report(args.dataset, args.out, args.max_samples))
    return 0
