"""SCD views, made in the loader workers: augment, noise, and a radius graph per view.

Every random draw comes from :func:`noise_rng`, a generator keyed by (seed, sample key, step, stream),
so a resumed run sees bit-identical views; nothing touches a global RNG.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from shards.format.schema import AtomGraph
from shards.stream.graph import radius_graph
from shards.stream.loader import SampleContext
from shards.stream.plan import RepeatSpec

__all__ = ["ViewConfig", "ViewTransform", "noise_rng", "make_views", "supercell", "random_rotation", "crop_indices"]


def noise_rng(seed: int, key: str, step: int, stream: str) -> np.random.Generator:
    """A Philox generator keyed by blake2b(seed, key, step, stream); identical in every process."""
    msg = f"{int(seed)}\0{key}\0{int(step)}\0{stream}".encode()
    digest = hashlib.blake2b(msg, digest_size=16, person=b"scd-views").digest()
    return np.random.Generator(np.random.Philox(key=int.from_bytes(digest, "little")))


@dataclass(frozen=True)
class ViewConfig:
    """How views are made. Lengths in Å.

    ``noise=False`` (fine-tuning) gives one view without jitter, noise or cell repeats; rotation
    and cropping still follow the config. Cell repeats apply to periodic structures whose domain
    is in ``repeat_domains``. ``max_neighbors`` caps non-periodic graphs, ``max_neighbors_periodic``
    periodic ones. ``crop_atoms`` crops larger structures: whole residues nearest to a random centre
    atom when ``residue_index`` exists, otherwise (non-periodic only) the nearest atoms.
    ``max_edges_per_atom`` is the edge budget of a view's graph (times its atom count, pairs within the
    cutoff before the neighbour cap): a structure over it raises :class:`~shards.stream.graph.EdgeBudgetError`,
    which the loader counts as oversize.
    """

    clean_sigma: float = 0.005
    noisy_sigma: float = 0.04
    rotate: bool = False
    crystal_repeat_p: float = 0.5
    crystal_max_repeat: int = 2
    repeat_domains: tuple[str, ...] = ("crystal",)
    cutoff: float = 5.0
    max_neighbors: int | None = None
    max_neighbors_periodic: int | None = 32
    self_loops: bool = False
    crop_atoms: int | None = None
    noise: bool = True
    max_edges_per_atom: int | None = 512


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A rotation matrix uniform on SO(3) (normalised Gaussian quaternion)."""
    q = rng.standard_normal(4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def supercell(positions: np.ndarray, numbers: np.ndarray, cell: np.ndarray, repeats: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Repeat a cell ``repeats`` times per axis. Atom ``a`` of image ``m`` (C order over
    ``repeats``) becomes atom ``flat(m) * n + a``. Returns (positions, numbers, cell)."""
    reps = np.asarray(repeats, dtype=np.int64)
    grid = np.stack(np.meshgrid(*[np.arange(r) for r in reps], indexing="ij"), -1).reshape(-1, 3)
    shifts = grid @ np.asarray(cell, dtype=np.float64)
    pos = (positions[None, :, :] + shifts[:, None, :]).reshape(-1, 3)
    return pos, np.tile(numbers, grid.shape[0]), cell * reps[:, None]


def crop_indices(positions: np.ndarray, residue_index: np.ndarray | None, budget: int,
                 rng: np.random.Generator, chain: np.ndarray | None = None) -> np.ndarray:
    """Sorted atom indices of a spatial crop around a random centre atom, at most ``budget`` atoms.

    With residues: whole residues (``chain``, ``residue_index``) in order of their closest atom's
    distance to the centre, until the next would exceed the budget. If the centre's own residue
    alone exceeds it, or without residues, the ``budget`` nearest atoms.
    """
    n = positions.shape[0]
    if n <= budget:
        return np.arange(n)
    centre = int(rng.integers(n))
    d = np.linalg.norm(positions - positions[centre], axis=1)
    if residue_index is not None:
        ids = residue_index.astype(np.int64)
        if chain is not None:
            _, chain_id = np.unique(chain, return_inverse=True)
            ids = chain_id.astype(np.int64) * (int(ids.max()) - int(ids.min()) + 1) + (ids - ids.min())
        _, res = np.unique(ids, return_inverse=True)
        n_res = int(res.max()) + 1
        res_d = np.full(n_res, np.inf)
        np.minimum.at(res_d, res, d)
        order = np.lexsort((np.arange(n_res), res_d))
        sizes = np.bincount(res, minlength=n_res)[order]
        fits = np.cumsum(sizes) <= budget
        n_keep = int(np.argmin(fits)) if not fits.all() else n_res
        if n_keep > 0:
            keep = np.zeros(n_res, dtype=bool)
            keep[order[:n_keep]] = True
            return np.nonzero(keep[res])[0]
    return np.sort(np.lexsort((np.arange(n), d))[:budget])


def _graph(pos: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cfg: ViewConfig
           ) -> tuple[np.ndarray, np.ndarray]:
    periodic = bool(pbc[0] or pbc[1] or pbc[2])
    k = cfg.max_neighbors_periodic if periodic else cfg.max_neighbors
    budget = None if cfg.max_edges_per_atom is None else cfg.max_edges_per_atom * max(pos.shape[0], 1)
    return radius_graph(pos, cell if periodic else None, pbc if periodic else None,
                        cfg.cutoff, k, cfg.self_loops, budget)


def make_views(g: AtomGraph, cfg: ViewConfig, seed: int, step: int,
               repeats: np.ndarray | None = None) -> dict[str, Any]:
    """Views of one structure as numpy arrays, graphs built per view after noising.

    SCD (``cfg.noise``): ``z, pos_clean, pos_noisy, noise, edge_index_clean, edge_shift_clean,
    edge_index_noisy, edge_shift_noisy, cell, pbc, n_atoms``; ``noise`` is the eps added to the
    noisy view. Fine-tuning: ``z, pos, edge_index, edge_shift, cell, pbc, n_atoms``.
    ``repeats`` (per cell axis) overrides the random cell repeat; the loader's planner passes it.
    """
    pos = g.positions.astype(np.float64)
    z = g.atomic_numbers.astype(np.int64)
    cell = g.cell.astype(np.float64)
    pbc = g.pbc.astype(bool)
    periodic = bool(pbc.any())
    aug: np.random.Generator | None = None

    def augment_rng() -> np.random.Generator:
        nonlocal aug
        if aug is None:
            aug = noise_rng(seed, g.key, step, "augment")
        return aug

    if cfg.crop_atoms is not None and z.shape[0] > cfg.crop_atoms and (
            g.residue_index is not None or not periodic):
        idx = crop_indices(pos, g.residue_index, int(cfg.crop_atoms), augment_rng(), g.chain)
        pos, z = pos[idx], z[idx]
    if repeats is not None:  # decided by the batch planner, which budgets the supercell's atoms
        reps = np.where(pbc, np.asarray(repeats, dtype=np.int64), 1)
        if periodic and (reps > 1).any():
            pos, z, cell = supercell(pos, z, cell, reps)
    elif (cfg.noise and periodic and g.domain in cfg.repeat_domains and cfg.crystal_max_repeat > 1
            and cfg.crystal_repeat_p > 0):
        rng = augment_rng()
        hit = rng.random(3) < cfg.crystal_repeat_p
        reps = np.where(hit & pbc, rng.integers(2, cfg.crystal_max_repeat + 1, size=3), 1)
        if (reps > 1).any():
            pos, z, cell = supercell(pos, z, cell, reps)
    if cfg.rotate:
        rot = random_rotation(augment_rng())
        pos, cell = pos @ rot.T, cell @ rot.T
    n = z.shape[0]
    out: dict[str, Any] = {"z": z}
    if cfg.noise:
        draws = noise_rng(seed, g.key, step, "noise").standard_normal((2, n, 3))
        jitter = draws[0] * cfg.clean_sigma
        eps = (draws[1] * cfg.noisy_sigma).astype(np.float32)
        pos_clean = (pos + jitter).astype(np.float32)
        pos_noisy = (pos + eps).astype(np.float32)
        out["pos_clean"], out["pos_noisy"], out["noise"] = pos_clean, pos_noisy, eps
        out["edge_index_clean"], out["edge_shift_clean"] = _graph(pos_clean, cell, pbc, cfg)
        out["edge_index_noisy"], out["edge_shift_noisy"] = _graph(pos_noisy, cell, pbc, cfg)
    else:
        out["pos"] = pos.astype(np.float32)
        out["edge_index"], out["edge_shift"] = _graph(out["pos"], cell, pbc, cfg)
    out["cell"] = cell.astype(np.float32)
    out["pbc"] = pbc
    out["n_atoms"] = np.int64(n)
    return out


class ViewTransform:
    """The loader's per-sample transform for SCD pretraining and fine-tuning: :func:`make_views` with the
    planner's crop and cell repeats (see :class:`shards.stream.loader.SampleContext`)."""

    def __init__(self, cfg: ViewConfig) -> None:
        self.cfg = cfg

    def __call__(self, g: AtomGraph, ctx: SampleContext) -> dict[str, Any]:
        cfg = dataclasses.replace(self.cfg, crop_atoms=ctx.crop_atoms) if ctx.crop_atoms is not None else self.cfg
        return make_views(g, cfg, ctx.seed, ctx.step, repeats=np.asarray(ctx.repeats, dtype=np.int64))

    def repeat_spec(self) -> RepeatSpec | None:
        """Cell repeats for the planner to draw (None unless noising: fine-tuning sees the cell as stored)."""
        v = self.cfg
        return RepeatSpec(v.crystal_repeat_p, v.crystal_max_repeat, tuple(v.repeat_domains)) if v.noise else None
