"""Energy + forces (+ stress) from a pretrained backbone: the model, its exact graphs and its files.

``EnergyModel`` runs the objective's backbone once (conditioned on the mask token, as in fine-tuning),
maps every atom's scalars to an energy, and sums them per structure on top of fixed per-element
reference energies (fitted on the training split). Forces are ``-dE/dx`` by autograd (with
``create_graph`` while training); the stress of a periodic cell is ``(1/V) dE/d(strain)`` (ASE sign
convention), from a symmetric strain applied to positions and periodic image shifts. The modulation
MLPs of the backbone see gradients (``stop_gradient`` off), so forces are exactly conservative.

Graphs come from :func:`shards.stream.graph.radius_graph_with_offsets` with no neighbour cap, so training and
the ASE calculator see the same exact periodic radius graph. A saved force field is a folder with
``model.safetensors`` and ``forcefield.json`` (model config, element references, elements trained on).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from scd_train.checkpoint import read_tensors
from scd_train.models.base import MAX_Z, Backbone, scatter_sum, set_stop_gradient
from scd_train.objectives import ObjectiveConfig, build_objective
from shards.config import from_dict, to_dict
from shards.format import jsoncheck as jc
from shards.stream.collate import collate
from shards.stream.graph import radius_graph_with_offsets

__all__ = ["FORMAT", "EnergyModel", "atom_batches", "fit_element_references", "graph_item", "load_forcefield",
           "save_forcefield", "structure_batch"]

FORMAT = "scd-forcefield/1"
META_NAME = "forcefield.json"
WEIGHTS_NAME = "model.safetensors"
MAX_META_BYTES = 1 << 20  # a force field's metadata is a few kB
_Z_KEY = re.compile(r"[1-9][0-9]{0,2}")


def _elements(v: Any) -> str | None:
    """A check of ``elements``: atomic numbers 1..118, each once."""
    bad = jc.int_list(v)
    if bad is not None:
        return bad
    if all(0 < z < MAX_Z for z in v) and len(set(v)) == len(v):
        return None
    return f"distinct atomic numbers 1..{MAX_Z - 1}"


def _element_refs(v: Any) -> str | None:
    """A check of ``element_ref_eV``: atomic number (as text) -> finite energy."""
    if not isinstance(v, dict):
        return "an object"
    for z, e in v.items():
        if not (_Z_KEY.fullmatch(z) and int(z) < MAX_Z) or isinstance(e, bool) or not isinstance(e, (int, float)) \
                or not math.isfinite(e):
            return f"atomic numbers 1..{MAX_Z - 1} mapped to finite energies (item {z!r})"
    return None


_META = {"format": jc.text, "model": jc.mapping, "elements": _elements}
_META_OPTIONAL = {"element_ref_eV": _element_refs}


class EnergyModel(nn.Module):
    """Backbone (mask-token conditioned) -> per-atom MLP x ``scale`` + element reference, summed per graph.

    ``element_ref`` (eV, float64, indexed by atomic number) is kept in float64 whatever the model dtype,
    outside ``state_dict`` (it is saved in ``forcefield.json``); ``scale`` (eV) is a buffer.
    """

    scale: Tensor

    def __init__(self, objective: Any, element_ref: np.ndarray | None = None, scale: float = 1.0) -> None:
        super().__init__()
        backbone: Backbone = objective.backbone
        hidden = int(backbone.hidden)
        self.objective = objective
        self.cutoff = float(backbone.cfg.cutoff)
        set_stop_gradient(backbone, False)
        last = nn.Linear(hidden // 2, 1)
        with torch.no_grad():  # start from the reference energies exactly (no random offsets per atom)
            last.weight.zero_()
            last.bias.zero_()
        self.head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden // 2), nn.SiLU(), last)
        self.register_buffer("scale", torch.tensor(float(scale)))
        ref = np.zeros(MAX_Z) if element_ref is None else np.asarray(element_ref, dtype=np.float64)
        if ref.shape != (MAX_Z,):
            raise ValueError(f"element_ref must have {MAX_Z} entries (by atomic number), got {ref.shape}")
        self.element_ref = torch.as_tensor(ref, dtype=torch.float64)

    def forward(self, batch: dict[str, Any], forces: bool = True, stress: bool = False,
                create_graph: bool = False, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``energy [G]`` (float64, eV), ``forces [N, 3]`` (eV/Å), ``stress [G, 3, 3]`` (eV/Å^3, NaN unless
        the graph is periodic in all three directions). Batch keys: ``z, pos, edge_index, edge_shift,
        batch, n_atoms, cell`` (``pbc`` optional). ``generator`` drives drop-path in training mode."""
        with torch.enable_grad() if (forces or stress) else torch.no_grad():
            return self._forward(batch, forces, stress, create_graph, generator)

    def _forward(self, batch: dict[str, Any], forces: bool, stress: bool, create_graph: bool,
                 generator: torch.Generator | None) -> dict[str, Tensor]:
        pos0 = batch["pos"]
        if forces and not pos0.requires_grad:
            pos0 = pos0.detach().requires_grad_(True)
        pos, shift, gidx = pos0, batch["edge_shift"].to(pos0.dtype), batch["batch"]
        n_graphs = int(batch["n_atoms"].shape[0])
        strain = None
        if stress:
            strain = torch.zeros(n_graphs, 3, 3, dtype=pos0.dtype, device=pos0.device, requires_grad=True)
            sym = 0.5 * (strain + strain.transpose(1, 2))
            pos = pos + torch.einsum("ni,nij->nj", pos, sym.index_select(0, gidx))
            edge_graph = gidx.index_select(0, batch["edge_index"][1])
            shift = shift + torch.einsum("ei,eij->ej", shift, sym.index_select(0, edge_graph))
        _, s, _ = self.objective.embed({**batch, "pos": pos, "edge_shift": shift}, generator=generator)
        atomic = self.head(s).squeeze(-1) * self.scale.to(s.dtype)
        ref = self.element_ref.to(s.device).index_select(0, batch["z"])
        energy = scatter_sum(atomic.double() + ref, gidx, n_graphs)
        out: dict[str, Tensor] = {"energy": energy}
        wrt = ([pos0] if forces else []) + ([strain] if strain is not None else [])
        if wrt:
            grads = torch.autograd.grad(energy.sum(), wrt, create_graph=create_graph)
            if forces:
                out["forces"] = -grads[0]
            if strain is not None:
                cell = batch["cell"].to(pos0.dtype).reshape(n_graphs, 3, 3)
                volume = torch.linalg.det(cell).abs()
                full = batch["pbc"].reshape(n_graphs, 3).all(dim=1) if "pbc" in batch else volume > 0
                out["stress"] = torch.where(full[:, None, None], grads[-1] / volume[:, None, None],
                                            torch.full_like(grads[-1], math.nan))
        return out


def fit_element_references(numbers: Sequence[np.ndarray], energies: np.ndarray) -> np.ndarray:
    """Least-squares per-element energies ``E ~ sum_z count_z ref_z`` (minimum-norm when the
    compositions do not determine them, e.g. one molecule's trajectory); [MAX_Z], 0 for absent elements."""
    counts = np.stack([np.bincount(np.asarray(z, dtype=np.int64), minlength=MAX_Z) for z in numbers])
    present = np.flatnonzero(counts.sum(axis=0))
    sol, *_ = np.linalg.lstsq(counts[:, present].astype(np.float64), np.asarray(energies, np.float64), rcond=None)
    ref = np.zeros(MAX_Z)
    ref[present] = sol
    return ref


def graph_item(numbers: np.ndarray, positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray,
               cutoff: float) -> dict[str, Any]:
    """One structure for :func:`shards.stream.collate.collate`: the exact radius graph (no neighbour cap),
    image shifts ``offsets @ cell`` in float64."""
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    cell_a = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    pbc_a = np.asarray(pbc, dtype=bool).reshape(3)
    periodic = bool(pbc_a.any())
    edge_index, offsets, _ = radius_graph_with_offsets(pos, cell_a if periodic else None,
                                                       pbc_a if periodic else None, cutoff)
    return {"z": np.asarray(numbers, dtype=np.int64), "pos": pos, "edge_index": edge_index,
            "edge_shift": offsets.astype(np.float64) @ cell_a, "cell": cell_a, "pbc": pbc_a,
            "n_atoms": np.int64(pos.shape[0])}


def atom_batches(sizes: Sequence[int], max_atoms: int) -> list[list[int]]:
    """Consecutive groups of indices whose atom counts sum to at most ``max_atoms`` (a larger
    structure forms a batch of its own)."""
    out: list[list[int]] = []
    cur: list[int] = []
    total = 0
    for i, n in enumerate(sizes):
        if cur and total + int(n) > max_atoms:
            out.append(cur)
            cur, total = [], 0
        cur.append(i)
        total += int(n)
    if cur:
        out.append(cur)
    return out


def structure_batch(items: list[dict[str, Any]], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Collate :func:`graph_item` dicts into tensors on ``device``; float arrays in ``dtype``."""
    batch = collate(items)
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, np.ndarray):
            t = torch.from_numpy(np.ascontiguousarray(v))
            out[k] = t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
        else:
            out[k] = v
    return out


def save_forcefield(model: EnergyModel, model_cfg: ObjectiveConfig, folder: str | Path, *,
                    elements: Sequence[int], extra: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` and ``forcefield.json`` into ``folder`` (each written atomically)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{WEIGHTS_NAME}.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(folder / WEIGHTS_NAME)
    meta = {"format": FORMAT, "model": to_dict(model_cfg), "cutoff": model.cutoff,
            "elements": sorted(int(z) for z in elements),
            "element_ref_eV": {str(z): float(model.element_ref[z]) for z in np.flatnonzero(model.element_ref.numpy())},
            "scale_eV": float(model.scale.item()), **(extra or {})}
    tmp = folder / f".{META_NAME}.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(folder / META_NAME)
    return folder


def load_forcefield(path: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> tuple[EnergyModel, dict[str, Any]]:
    """A saved force field (its folder or its ``forcefield.json``) in eval mode, and its metadata; a damaged
    or foreign file is one ``ValueError`` line naming it."""
    p = Path(path)
    folder = p.parent if p.name == META_NAME else p
    meta_path = folder / META_NAME
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder}: no {META_NAME}; pass the output folder of an energy_forces fine-tuning")
    meta = read_meta(meta_path)
    names = {f.name for f in dataclasses.fields(ObjectiveConfig)}
    model_cfg = from_dict(ObjectiveConfig, {k: v for k, v in meta["model"].items() if k in names}, str(meta_path))
    ref = np.zeros(MAX_Z)
    for z, e in meta.get("element_ref_eV", {}).items():
        ref[int(z)] = float(e)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = EnergyModel(build_objective(dataclasses.replace(model_cfg, drop_path=0.0)), ref)
    tensors = read_tensors(folder / WEIGHTS_NAME)  # a CheckpointError (a ValueError) line when unreadable
    own = model.state_dict()
    bad = sorted(set(own) ^ set(tensors)) + [k for k in own if k in tensors and own[k].shape != tensors[k].shape]
    if bad:
        raise ValueError(f"{folder / WEIGHTS_NAME}: weights do not match {META_NAME} (first: {bad[0]})")
    model.load_state_dict(tensors)
    return model.to(device=device, dtype=dtype).eval(), meta


def read_meta(path: Path) -> dict[str, Any]:
    """``forcefield.json``, checked: its format, a model config, the elements trained on (1..118, each once) and
    finite element references; anything else is one ``ValueError`` line naming the file."""
    where = str(path)
    with open(path, "rb") as fh:
        raw = fh.read(MAX_META_BYTES + 1)
    if len(raw) > MAX_META_BYTES:
        raise ValueError(f"{where}: larger than {MAX_META_BYTES} bytes; not a force field's metadata")
    meta = jc.check_fields(jc.load_json(raw, where), where, _META, _META_OPTIONAL, what="force-field metadata")
    if meta["format"] != FORMAT:
        raise ValueError(f"{where}: unknown force-field format {meta['format']!r} (expected {FORMAT})")
    return meta
