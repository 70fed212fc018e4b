"""Radius graphs with exact periodic images (pure numpy/scipy).

Convention (the model code relies on it): for edge ``e`` with ``src = edge_index[0, e]`` and
``dst = edge_index[1, e]`` the vector from ``dst`` to the neighbouring image of ``src`` is
``positions[src] + edge_shift[e] - positions[dst]``, where ``edge_shift = S @ cell`` for an integer
image offset ``S`` (zero along non-periodic axes). Edges are kept when ``distance < cutoff``
(strictly, as ``ase.neighborlist.neighbor_list``). An atom's own periodic images (``src == dst``,
``S != 0``) are real neighbours; only the zero-shift self pair is a self loop (off by default).

Output order is deterministic: by ``dst``, then distance, then ``src``, then the image offset.

``max_edges`` bounds the work per structure: a structure with more pairs within the cutoff (counted
before any ``max_neighbors`` cut) raises :class:`EdgeBudgetError`. Periodic structures are estimated
first from their density (``n^2 x ball volume / cell volume``), so a pathological cell (0.2 Å cell
vectors: ~260,000 pairs for 2 atoms) is refused before its images are built.
"""
from __future__ import annotations

import functools

import numpy as np
from scipy.spatial import cKDTree
from scipy.spatial.distance import cdist

__all__ = ["radius_graph", "radius_graph_with_offsets", "image_counts", "EdgeBudgetError", "estimated_pairs"]

_DENSE_MAX = 250_000  # dense all-pairs when n_dst * n_src * n_images stays below this
_SMALL = 96  # non-periodic systems up to this size use the sorted dense path
_SLACK = 1e-6
_REDUCE_ABOVE = 343  # reduce skewed cells when they would need more images than 7 x 7 x 7


_ESTIMATE_SLACK = 4  # refuse before building when the density estimate exceeds the budget this many times


class EdgeBudgetError(ValueError):
    """A structure has more neighbour pairs within the cutoff than the per-structure edge budget."""

    def __init__(self, n_pairs: int, max_edges: int, estimated: bool) -> None:
        about = "about " if estimated else ""
        super().__init__(f"{about}{n_pairs} neighbour pairs within the cutoff, over the edge budget of {max_edges}")
        self.n_pairs, self.max_edges = n_pairs, max_edges


def estimated_pairs(n_atoms: int, cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> float:
    """Expected ordered pairs within ``cutoff`` of ``n_atoms`` spread over the periodic cell:
    ``n^2 x`` (ball volume in the periodic dimensions) ``/`` (cell measure in those dimensions)."""
    per = np.asarray(cell, dtype=np.float64)[np.asarray(pbc, dtype=bool)]
    dim = per.shape[0]
    if dim == 0:
        return 0.0
    measure = float(np.sqrt(max(np.linalg.det(per @ per.T), 0.0)))
    ball = (2.0 * cutoff, np.pi * cutoff ** 2, 4.0 / 3.0 * np.pi * cutoff ** 3)[dim - 1]
    return float(n_atoms) ** 2 * ball / measure if measure > 0 else float("inf")


def image_counts(cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> np.ndarray:
    """Images needed per axis, ``ceil(cutoff / h_i)`` with ``h_i = V / |a_j x a_k|``; 0 if not periodic."""
    pbc = np.asarray(pbc, dtype=bool)
    full = _complete_cell(np.asarray(cell, dtype=np.float64), pbc)
    return _reach(np.linalg.inv(full), pbc, cutoff)


def _reach(inv: np.ndarray, pbc: np.ndarray, cutoff: float) -> np.ndarray:
    # column i of inv(cell) is (a_j x a_k) / V, so its norm is 1 / h_i
    inv_h = np.sqrt(np.einsum("ij,ij->j", inv, inv))
    return np.where(pbc, np.ceil((cutoff + _SLACK) * inv_h), 0).astype(np.int64)


@functools.lru_cache(maxsize=256)
def _image_grid(r0: int, r1: int, r2: int) -> np.ndarray:
    axes = [np.arange(-r, r + 1, dtype=np.int64) for r in (r0, r1, r2)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    grid.flags.writeable = False
    return grid


def _complete_cell(cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """A full-rank basis whose periodic rows are the cell's; non-periodic rows replaced if needed."""
    if abs(np.linalg.det(cell)) > 1e-9 * max(1.0, float(np.abs(cell).max()) ** 3):
        return cell
    per = cell[pbc]
    if per.shape[0] and np.linalg.matrix_rank(per) < per.shape[0]:
        raise ValueError("periodic cell vectors are linearly dependent")
    # orthonormal complement of the periodic rows, via SVD
    _, _, vt = np.linalg.svd(per if per.shape[0] else np.zeros((1, 3)), full_matrices=True)
    comp = vt[per.shape[0]:]
    full = cell.copy()
    full[~pbc] = comp
    return full


def _reduce_cell(cell: np.ndarray, pbc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairwise Lagrange reduction of the periodic rows: ``(reduced, U)`` with ``reduced = U @ cell``,
    ``U`` unimodular. Offsets in the reduced basis map back as ``n @ U``."""
    red, unimod = cell.copy(), np.eye(3, dtype=np.int64)
    axes = [i for i in range(3) if pbc[i]]
    for _ in range(64):
        changed = False
        for i in axes:
            for j in axes:
                if i != j:
                    m = round(float(red[i] @ red[j]) / float(red[j] @ red[j]))
                    if m:
                        red[i] -= m * red[j]
                        unimod[i] -= m * unimod[j]
                        changed = True
        if not changed:
            break
    return red, unimod


def _finish(positions: np.ndarray, cell: np.ndarray, src: np.ndarray, dst: np.ndarray,
            offsets: np.ndarray, cutoff: float, max_neighbors: int | None,
            self_loops: bool, max_edges: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Exact distances from the original positions, strict filter, sort, k-nearest, self loops."""
    shift = offsets @ cell if offsets.shape[0] else np.zeros((0, 3))
    vec = positions[src] + shift - positions[dst]
    dist = np.sqrt(np.einsum("ij,ij->i", vec, vec))
    self_pair = (src == dst) & ~offsets.any(axis=1)
    keep = (dist < cutoff) & ~self_pair
    if max_edges is not None and int(keep.sum()) > max_edges:
        raise EdgeBudgetError(int(keep.sum()), max_edges, estimated=False)
    src, dst, offsets, dist = src[keep], dst[keep], offsets[keep], dist[keep]
    if self_loops:
        n = positions.shape[0]
        ar = np.arange(n, dtype=np.int64)
        src, dst = np.concatenate([src, ar]), np.concatenate([dst, ar])
        offsets = np.concatenate([offsets, np.zeros((n, 3), dtype=np.int64)])
        dist = np.concatenate([dist, np.zeros(n)])
    if offsets.any():
        lo = offsets.min(axis=0)
        span = offsets.max(axis=0) - lo + 1
        code = ((offsets[:, 0] - lo[0]) * span[1] + offsets[:, 1] - lo[1]) * span[2] + offsets[:, 2] - lo[2]
        order = np.lexsort((src * int(span.prod()) + code, dist, dst))
    else:
        order = np.lexsort((src, dist, dst))
    src, dst, offsets, dist = src[order], dst[order], offsets[order], dist[order]
    if max_neighbors is not None and dst.shape[0]:
        counts = np.bincount(dst, minlength=positions.shape[0])
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        rank = np.arange(dst.shape[0]) - starts[dst]
        sel = rank < max_neighbors
        src, dst, offsets, dist = src[sel], dst[sel], offsets[sel], dist[sel]
    return src, dst, offsets, dist


def _molecule_dense(pos: np.ndarray, cutoff: float, max_neighbors: int | None,
                    self_loops: bool, max_edges: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Small non-periodic systems: all pairs, rows sorted by (distance, src)."""
    dist = cdist(pos, pos)
    if not self_loops:
        np.fill_diagonal(dist, np.inf)
    order = np.argsort(dist, axis=1, kind="stable")
    dsort = dist[np.arange(pos.shape[0])[:, None], order]
    mask = dsort < cutoff
    if max_edges is not None:
        pairs = int(mask.sum()) - (pos.shape[0] if self_loops else 0)
        if pairs > max_edges:
            raise EdgeBudgetError(pairs, max_edges, estimated=False)
    if max_neighbors is not None:
        mask[:, max_neighbors:] = False
    dst, col = mask.nonzero()
    edge_index = np.empty((2, dst.shape[0]), dtype=np.int64)
    edge_index[0] = order[dst, col]
    edge_index[1] = dst
    return edge_index, dsort[dst, col]


def _pairs_molecule(pos: np.ndarray, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    n = pos.shape[0]
    if n * n <= _DENSE_MAX:
        diff = pos[None, :, :] - pos[:, None, :]
        d2 = np.einsum("ijk,ijk->ij", diff, diff)
        dst, src = np.nonzero(d2 < (cutoff + _SLACK) ** 2)
        return src.astype(np.int64), dst.astype(np.int64)
    pairs = cKDTree(pos).query_pairs(cutoff + _SLACK, output_type="ndarray").astype(np.int64)
    return np.concatenate([pairs[:, 0], pairs[:, 1]]), np.concatenate([pairs[:, 1], pairs[:, 0]])


def _pairs_periodic(pos: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidate (src, dst, integer offset) triples, offsets relative to the original positions."""
    full = _complete_cell(cell, pbc)
    inv = np.linalg.inv(full)
    unimod = None
    if np.prod(2 * _reach(inv, pbc, cutoff) + 1) > _REDUCE_ABOVE:
        full, unimod = _reduce_cell(full, pbc)
        inv = np.linalg.inv(full)
    frac = pos @ inv
    wrap = np.where(pbc, np.floor(frac), 0.0)
    frac = frac - wrap
    wrap = wrap.astype(np.int64)
    pos_w = frac @ full
    reach = _reach(inv, pbc, cutoff)
    images = _image_grid(int(reach[0]), int(reach[1]), int(reach[2]))
    n = pos.shape[0]
    if n * n * images.shape[0] <= _DENSE_MAX:
        img = images @ full
        diff = pos_w[None, :, None, :] + img[None, None, :, :] - pos_w[:, None, None, :]
        d2 = np.einsum("ijmk,ijmk->ijm", diff, diff)
        dst, src, m = np.nonzero(d2 < (cutoff + _SLACK) ** 2)
        n_img = images[m]
    else:
        # replicate only the image points that can lie within the cutoff of the wrapped cell
        margin = np.where(pbc, (cutoff + _SLACK) * np.sqrt(np.einsum("ij,ij->j", inv, inv)), np.inf)
        f_img = frac[None, :, :] + images[:, None, :]
        ok = np.all((f_img > -margin) & (f_img < 1.0 + margin), axis=-1)
        m, src = np.nonzero(ok)
        pts = f_img[m, src] @ full
        sdm = cKDTree(pos_w).sparse_distance_matrix(cKDTree(pts), cutoff + _SLACK,
                                                    output_type="ndarray")
        dst, j = sdm["i"].astype(np.int64), sdm["j"].astype(np.int64)
        src, n_img = src[j], images[m[j]]
    src, dst = src.astype(np.int64), dst.astype(np.int64)
    offsets = n_img - wrap[src] + wrap[dst]
    if unimod is not None:
        offsets = offsets @ unimod
    return src, dst, offsets


def radius_graph_with_offsets(positions: np.ndarray, cell: np.ndarray | None = None,
                              pbc: np.ndarray | None = None, cutoff: float = 5.0,
                              max_neighbors: int | None = None, self_loops: bool = False,
                              max_edges: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Like :func:`radius_graph`, returning ``(edge_index [2,E], offsets int64 [E,3], distance [E])``."""
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    pbc_a = np.zeros(3, dtype=bool) if pbc is None else np.asarray(pbc, dtype=bool).reshape(3)
    cell_a = np.zeros((3, 3)) if cell is None else np.asarray(cell, dtype=np.float64).reshape(3, 3)
    if cutoff <= 0:
        raise ValueError(f"cutoff must be positive, got {cutoff}")
    if not pbc_a.any() and pos.shape[0] <= _SMALL:
        edge_index, dist = _molecule_dense(pos, float(cutoff), max_neighbors, self_loops, max_edges)
        return edge_index, np.zeros((dist.shape[0], 3), dtype=np.int64), dist
    if pbc_a.any():
        if max_edges is not None:
            est = estimated_pairs(pos.shape[0], cell_a, pbc_a, float(cutoff))
            if est > _ESTIMATE_SLACK * max_edges:
                raise EdgeBudgetError(int(min(est, 2 ** 62)), max_edges, estimated=True)
        src, dst, offsets = _pairs_periodic(pos, cell_a, pbc_a, float(cutoff))
    else:
        src, dst = _pairs_molecule(pos, float(cutoff))
        offsets = np.zeros((src.shape[0], 3), dtype=np.int64)
    src, dst, offsets, dist = _finish(pos, cell_a, src, dst, offsets, float(cutoff),
                                      max_neighbors, self_loops, max_edges)
    return np.stack([src, dst]), offsets, dist


def radius_graph(positions: np.ndarray, cell: np.ndarray | None = None,
                 pbc: np.ndarray | None = None, cutoff: float = 5.0,
                 max_neighbors: int | None = None, self_loops: bool = False,
                 max_edges: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Radius graph ``(edge_index int64 [2,E], edge_shift float32 [E,3])``; see the module docstring.

    ``max_neighbors`` keeps the nearest ``k`` sources per ``dst`` atom, ties broken by
    ``(distance, src, image offset)``. ``max_edges`` raises :class:`EdgeBudgetError` beyond that many pairs.
    """
    if pbc is None or not (pbc[0] or pbc[1] or pbc[2]):
        pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
        if pos.shape[0] <= _SMALL and cutoff > 0:
            edge_index, _ = _molecule_dense(pos, float(cutoff), max_neighbors, self_loops, max_edges)
        else:
            edge_index, _, _ = radius_graph_with_offsets(pos, None, None, cutoff, max_neighbors,
                                                         self_loops, max_edges)
        return edge_index, np.zeros((edge_index.shape[1], 3), dtype=np.float32)
    edge_index, offsets, _ = radius_graph_with_offsets(positions, cell, pbc, cutoff,
                                                       max_neighbors, self_loops, max_edges)
    cell_a = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    return edge_index, (offsets @ cell_a).astype(np.float32)
