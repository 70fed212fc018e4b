"""E(3) equivariance of every registered backbone: rotations, reflections, translations,
permutations, periodic images and batching independence."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from scd_train.models import BACKBONES, Backbone, build_backbone
from shards.stream.graph import radius_graph

CUTOFF = 3.0


def _tiny(cfg_type: type) -> Backbone:
    fields = {f.name for f in dataclasses.fields(cfg_type)}
    kw = {"hidden": 32, "layers": 3, "num_rbf": 8, "cutoff": CUTOFF, "drop_path": 0.0}
    if "heads" in fields:
        kw["heads"] = 4
    torch.manual_seed(0)
    return build_backbone(cfg_type(**kw)).double().eval()


def _orthogonal(seed: int, reflect: bool) -> torch.Tensor:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    if reflect:
        q = q @ np.diag([1.0, 1.0, -1.0])
    return torch.as_tensor(q, dtype=torch.float64)


def _graph(pos: np.ndarray, cell: np.ndarray | None = None, pbc: np.ndarray | None = None):
    ei, shift = radius_graph(pos, cell, pbc, cutoff=CUTOFF)
    return torch.as_tensor(ei), torch.as_tensor(shift, dtype=torch.float64)


def _molecule(seed: int, n: int = 9) -> tuple[torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = torch.as_tensor(rng.choice([1, 6, 7, 8, 9], size=n), dtype=torch.int64)
    return z, rng.normal(scale=1.2, size=(n, 3))


def _cond(seed: int, g: int = 1) -> torch.Tensor:
    return torch.randn(g, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _run(model: Backbone, z, pos, ei, shift, cond, batch=None):
    pos_t = torch.as_tensor(pos, dtype=torch.float64)
    b = torch.zeros(len(z), dtype=torch.int64) if batch is None else batch
    with torch.no_grad():
        return model(z, pos_t, ei, shift, b, cond)


BACKBONE_TYPES = pytest.mark.parametrize("cfg_type", list(BACKBONES), ids=lambda t: t.__name__)


@BACKBONE_TYPES
@pytest.mark.parametrize("reflect", [False, True], ids=["rotation", "reflection"])
def test_rotation_equivariance(cfg_type, reflect):
    model = _tiny(cfg_type)
    z, pos = _molecule(1)
    ei, shift = _graph(pos)
    cond = _cond(2)
    rot = _orthogonal(3, reflect)
    s, v = _run(model, z, pos, ei, shift, cond)
    s2, v2 = _run(model, z, pos @ rot.numpy().T, ei, shift, cond)
    assert v.abs().max() > 1e-3, "vector features are trivially zero"
    torch.testing.assert_close(s2, s, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(v2, torch.einsum("ij,njf->nif", rot, v), atol=1e-9, rtol=1e-9)


@BACKBONE_TYPES
def test_rotation_equivariance_float32(cfg_type):
    model = _tiny(cfg_type).float()
    z, pos = _molecule(4)
    ei, shift = _graph(pos)
    cond = _cond(5).float()
    rot = _orthogonal(6, False)
    b = torch.zeros(len(z), dtype=torch.int64)
    with torch.no_grad():
        s, v = model(z, torch.as_tensor(pos, dtype=torch.float32), ei, shift.float(), b, cond)
        s2, v2 = model(z, torch.as_tensor(pos @ rot.numpy().T, dtype=torch.float32), ei, shift.float(), b, cond)
    torch.testing.assert_close(s2, s, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(v2, torch.einsum("ij,njf->nif", rot.float(), v), atol=1e-4, rtol=1e-4)


@BACKBONE_TYPES
def test_translation_invariance(cfg_type):
    model = _tiny(cfg_type)
    z, pos = _molecule(7)
    ei, shift = _graph(pos)
    cond = _cond(8)
    s, v = _run(model, z, pos, ei, shift, cond)
    s2, v2 = _run(model, z, pos + np.array([3.0, -7.5, 11.0]), ei, shift, cond)
    torch.testing.assert_close(s2, s, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(v2, v, atol=1e-9, rtol=1e-9)


@BACKBONE_TYPES
def test_permutation_equivariance(cfg_type):
    model = _tiny(cfg_type)
    z, pos = _molecule(9)
    ei, shift = _graph(pos)
    cond = _cond(10)
    perm = torch.as_tensor(np.random.default_rng(11).permutation(len(z)))
    inv = torch.argsort(perm)
    s, v = _run(model, z, pos, ei, shift, cond)
    edge_order = torch.as_tensor(np.random.default_rng(12).permutation(ei.shape[1]))
    ei_p = inv[ei][:, edge_order]
    s2, v2 = _run(model, z[perm], pos[perm.numpy()], ei_p, shift[edge_order], cond)
    torch.testing.assert_close(s2, s[perm], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(v2, v[perm], atol=1e-9, rtol=1e-9)


@BACKBONE_TYPES
@pytest.mark.parametrize("reflect", [False, True], ids=["rotation", "reflection"])
def test_periodic_equivariance(cfg_type, reflect):
    model = _tiny(cfg_type)
    rng = np.random.default_rng(13)
    cell = np.array([[3.2, 0.0, 0.0], [0.9, 3.0, 0.0], [0.4, 0.6, 3.4]])
    pbc = np.array([True, True, True])
    pos = rng.uniform(size=(4, 3)) @ cell
    z = torch.as_tensor([3, 8, 14, 26])
    ei, shift = _graph(pos, cell, pbc)
    assert (shift.abs().sum(-1) > 0).any(), "no periodic images in the test graph"
    cond = _cond(14)
    rot = _orthogonal(15, reflect)
    s, v = _run(model, z, pos, ei, shift, cond)
    s2, v2 = _run(model, z, pos @ rot.numpy().T, ei, shift @ rot.T, cond)
    torch.testing.assert_close(s2, s, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(v2, torch.einsum("ij,njf->nif", rot, v), atol=1e-9, rtol=1e-9)
    ei3, shift3 = _graph(pos @ rot.numpy().T, cell @ rot.numpy().T, pbc)
    s3, _ = _run(model, z, pos @ rot.numpy().T, ei3, shift3, cond)
    torch.testing.assert_close(s3, s, atol=1e-5, rtol=1e-5)  # float32 shifts from radius_graph


@BACKBONE_TYPES
def test_batching_independence(cfg_type):
    model = _tiny(cfg_type)
    z1, p1 = _molecule(16, 7)
    z2, p2 = _molecule(17, 11)
    (e1, sh1), (e2, sh2) = _graph(p1), _graph(p2)
    c = _cond(18, 2)
    s1, v1 = _run(model, z1, p1, e1, sh1, c[:1])
    s2, v2 = _run(model, z2, p2, e2, sh2, c[1:])
    batch = torch.repeat_interleave(torch.arange(2), torch.tensor([7, 11]))
    s, v = _run(model, torch.cat([z1, z2]), np.concatenate([p1, p2]), torch.cat([e1, e2 + 7], 1),
                torch.cat([sh1, sh2]), c, batch)
    torch.testing.assert_close(s, torch.cat([s1, s2]), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(v, torch.cat([v1, v2]), atol=1e-10, rtol=1e-10)


@BACKBONE_TYPES
def test_conditioning_changes_output(cfg_type):
    model = _tiny(cfg_type)
    z, pos = _molecule(19)
    ei, shift = _graph(pos)
    s1, v1 = _run(model, z, pos, ei, shift, _cond(20))
    s2, v2 = _run(model, z, pos, ei, shift, _cond(21))
    assert (s1 - s2).abs().max() > 1e-3 and (v1 - v2).abs().max() > 1e-4


@BACKBONE_TYPES
def test_drop_path_seeded_and_off_in_eval(cfg_type):
    model = _tiny(cfg_type)
    model = build_backbone(dataclasses.replace(model.cfg, drop_path=0.5)).double()
    z, pos = _molecule(22)
    ei, shift = _graph(pos)
    cond = _cond(23)
    args = (z, torch.as_tensor(pos), ei, shift, torch.zeros(len(z), dtype=torch.int64), cond)
    model.train()
    a = model(*args, generator=torch.Generator().manual_seed(1))[0]
    b = model(*args, generator=torch.Generator().manual_seed(1))[0]
    c = model(*args, generator=torch.Generator().manual_seed(2))[0]
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (a - c).abs().max() > 1e-6
    with pytest.raises(ValueError):
        model(*args)
    model.eval()
    torch.testing.assert_close(model(*args)[0], model(*args)[0], atol=0, rtol=0)


@BACKBONE_TYPES
def test_structure_without_edges(cfg_type):
    """A lone atom (or atoms farther apart than the cutoff) has no edges: finite output, no crash."""
    model = _tiny(cfg_type)
    z = torch.tensor([6, 8], dtype=torch.int64)
    pos = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 4 * CUTOFF]])
    ei, shift = _graph(pos)
    assert ei.shape == (2, 0)
    s, v = _run(model, z, pos, ei, shift, _cond(0))
    assert s.shape[0] == 2 and torch.isfinite(s).all() and torch.isfinite(v).all()
    s1, _ = _run(model, z[:1], pos[:1], *_graph(pos[:1]), _cond(0))
    torch.testing.assert_close(s1[0], s[0], rtol=0, atol=1e-12)


# --- model options (issue 14): each passes the same equivariance checks and really changes the model ---

OPTION_VALUES = {"adaln": "ln_zero", "layer_norm": True, "self_loops": True, "vector_cutoff": True}
OPTION_CASES = [(t, name) for t in BACKBONES for name in OPTION_VALUES
                if name in {f.name for f in dataclasses.fields(t)}]
OPTION_IDS = [f"{t.__name__}-{name}" for t, name in OPTION_CASES]


def _with_option(cfg_type: type, name: str | None, perturb: bool = True) -> Backbone:
    """The tiny backbone with one option on; weights perturbed (seeded) so zero-initialised gates act."""
    base = _tiny(cfg_type)
    cfg = dataclasses.replace(base.cfg, **({name: OPTION_VALUES[name]} if name else {}))
    torch.manual_seed(0)
    model = build_backbone(cfg).double().eval()
    if perturb:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


@pytest.mark.parametrize(("cfg_type", "name"), OPTION_CASES, ids=OPTION_IDS)
def test_model_option_is_exactly_equivariant(cfg_type, name):
    model = _with_option(cfg_type, name)
    z, pos = _molecule(31)
    ei, shift = _graph(pos)
    cond = _cond(32)
    s, v = _run(model, z, pos, ei, shift, cond)
    assert v.abs().max() > 1e-3 and s.std() > 1e-3, "trivial features"
    for reflect in (False, True):
        rot = _orthogonal(33, reflect)
        s2, v2 = _run(model, z, pos @ rot.numpy().T + np.array([1.5, -2.0, 0.7]), ei, shift, cond)
        torch.testing.assert_close(s2, s, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(v2, torch.einsum("ij,njf->nif", rot, v), atol=1e-9, rtol=1e-9)
    perm = torch.as_tensor(np.random.default_rng(34).permutation(len(z)))
    inv = torch.argsort(perm)
    s3, v3 = _run(model, z[perm], pos[perm.numpy()], inv[ei], shift, cond)
    torch.testing.assert_close(s3, s[perm], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(v3, v[perm], atol=1e-9, rtol=1e-9)
    cell = np.array([[3.2, 0.0, 0.0], [0.9, 3.0, 0.0], [0.4, 0.6, 3.4]])
    pbc = np.array([True, True, True])
    cpos = np.random.default_rng(35).uniform(size=(4, 3)) @ cell
    cz = torch.as_tensor([3, 8, 14, 26])
    cei, cshift = _graph(cpos, cell, pbc)
    rot = _orthogonal(36, True)
    s, v = _run(model, cz, cpos, cei, cshift, cond)
    s2, v2 = _run(model, cz, cpos @ rot.numpy().T, cei, cshift @ rot.T, cond)
    torch.testing.assert_close(s2, s, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(v2, torch.einsum("ij,njf->nif", rot, v), atol=1e-9, rtol=1e-9)
    c2 = _cond(44, 2)
    s1, v1 = _run(model, z, pos, ei, shift, c2[:1])
    s2, v2 = _run(model, cz, cpos, cei, cshift, c2[1:])
    both = torch.repeat_interleave(torch.arange(2), torch.tensor([len(z), len(cz)]))
    s3, v3 = _run(model, torch.cat([z, cz]), np.concatenate([pos, cpos]), torch.cat([ei, cei + len(z)], 1),
                  torch.cat([shift, cshift]), c2, both)
    torch.testing.assert_close(s3, torch.cat([s1, s2]), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(v3, torch.cat([v1, v2]), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize(("cfg_type", "name"), OPTION_CASES, ids=OPTION_IDS)
def test_model_option_changes_the_model(cfg_type, name):
    """Same weights (where they exist) with the option off and on give different features."""
    on = _with_option(cfg_type, name)
    off = _with_option(cfg_type, None, perturb=False)
    missing, unexpected = off.load_state_dict(on.state_dict(), strict=False)
    assert not missing
    z, pos = _molecule(37)
    ei, shift = _graph(pos)
    s1, v1 = _run(on, z, pos, ei, shift, _cond(38))
    s0, v0 = _run(off, z, pos, ei, shift, _cond(38))
    assert (s1 - s0).abs().max() > 1e-4 or (v1 - v0).abs().max() > 1e-4


def test_ln_zero_gates_start_at_zero():
    """adaLN-Zero: every scalar residual update of a fresh model is exactly 0, whatever the condition."""
    from scd_train.models.base import AdaLN

    ada = AdaLN(16, "ln_zero").double()
    x = torch.randn(5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _, gate = ada(x, _cond(39)[:, :16], torch.zeros(5, dtype=torch.int64))
    assert torch.equal(gate, torch.zeros_like(gate))
    _, gate = AdaLN(16).double()(x, _cond(39)[:, :16], torch.zeros(5, dtype=torch.int64))
    assert gate.abs().min() > 0.05  # the layer-scale default starts open


@BACKBONE_TYPES
def test_self_loops_from_views_are_not_doubled(cfg_type):
    """The model's self loops replace those a view already has: the same features either way."""
    model = _with_option(cfg_type, "self_loops")
    z, pos = _molecule(40)
    ei, shift = _graph(pos)
    ei_l, shift_l = radius_graph(pos, None, None, cutoff=CUTOFF, self_loops=True)
    assert ei_l.shape[1] == ei.shape[1] + len(z)
    s, v = _run(model, z, pos, ei, shift, _cond(41))
    s2, v2 = _run(model, z, pos, torch.as_tensor(ei_l), torch.as_tensor(shift_l, dtype=torch.float64), _cond(41))
    torch.testing.assert_close(s2, s, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(v2, v, atol=1e-10, rtol=1e-10)


@BACKBONE_TYPES
def test_self_loop_gradients_keep_float32_precision(cfg_type):
    """d(sum s)/d pos with self loops: float32 agrees with float64 (no huge cancelling terms)."""
    model = _with_option(cfg_type, "self_loops")
    z, pos = _molecule(42)
    ei, shift = _graph(pos)
    grads = []
    for dtype in (torch.float64, torch.float32):
        m = model.to(dtype)
        p = torch.as_tensor(pos, dtype=dtype).requires_grad_(True)
        s, v = m(z, p, ei, shift.to(dtype), torch.zeros(len(z), dtype=torch.int64), _cond(43).to(dtype))
        (s.sum() + v.pow(2).sum()).backward()
        grads.append(p.grad.double())
    assert torch.isfinite(grads[1]).all()
    torch.testing.assert_close(grads[1], grads[0], atol=1e-3 * grads[0].abs().max().item(), rtol=1e-3)


def _objective_batch(kind: str, center_noise: bool):
    """A float64 objective (fresh noise statistics: mean 0, std 1) and a two-molecule SCD batch."""
    from scd_train.objectives import ObjectiveConfig, build_objective
    from scd_train.views import ViewConfig, make_views
    from shards.format.schema import AtomGraph
    from shards.stream.collate import collate

    torch.manual_seed(0)
    obj = build_objective(ObjectiveConfig(kind=kind, hidden=32, layers=2, heads=4, num_rbf=8, cutoff=CUTOFF,
                                          drop_path=0.0, center_noise=center_noise)).double().eval()
    items = []
    for i, n in enumerate((7, 10)):
        z, pos = _molecule(50 + i, n)
        g = AtomGraph(key=f"m{i}", domain="molecule", source="t", source_file="t", index=i,
                      atomic_numbers=z.numpy().astype(np.uint8), positions=pos.astype(np.float32),
                      cell=np.zeros((3, 3)), pbc=np.zeros(3, dtype=bool))
        items.append(make_views(g, ViewConfig(cutoff=CUTOFF), seed=1, step=0))
    batch = {k: torch.as_tensor(v) for k, v in collate(items).items() if isinstance(v, np.ndarray)}
    for k in ("pos_clean", "pos_noisy", "noise", "edge_shift_clean", "edge_shift_noisy"):
        batch[k] = batch[k].double()
    return obj, batch


def _loss(obj, batch) -> float:
    with torch.no_grad():
        return float(obj(batch)[0])


@pytest.mark.parametrize("kind", ["scd", "denoise"])
def test_noise_centring_removes_the_unlearnable_translation(kind):
    """With center_noise the target has zero mean per structure and the loss ignores a translation of one
    structure's noisy view (which the model cannot see); without it the loss changes."""
    for centred in (True, False):
        obj, batch = _objective_batch(kind, centred)
        target = obj.noise_target(batch)
        sums = torch.zeros(2, 3, dtype=torch.float64).index_add_(0, batch["batch"], target)
        if centred:
            torch.testing.assert_close(sums, torch.zeros_like(sums), atol=1e-12, rtol=0)
            manual = batch["noise"][batch["batch"] == 1] - batch["noise"][batch["batch"] == 1].mean(0)
            torch.testing.assert_close(target[batch["batch"] == 1], manual, atol=1e-12, rtol=0)
        else:
            assert torch.equal(target, batch["noise"])
        moved = dict(batch)
        shift = torch.where((batch["batch"] == 1).unsqueeze(-1), torch.tensor([0.03, -0.02, 0.05]), 0.0)
        moved["pos_noisy"], moved["noise"] = batch["pos_noisy"] + shift, batch["noise"] + shift
        a, b = _loss(obj, batch), _loss(obj, moved)
        if centred:
            assert a == pytest.approx(b, rel=1e-6)  # the loss is summed in float32
        else:
            assert abs(a - b) > 1e-3 * a


@pytest.mark.parametrize("reflect", [False, True], ids=["rotation", "reflection"])
def test_noise_centring_loss_is_invariant(reflect):
    obj, batch = _objective_batch("scd", True)
    rot = _orthogonal(60, reflect)
    turned = dict(batch)
    for k in ("pos_clean", "pos_noisy", "noise"):
        turned[k] = batch[k] @ rot.T
    assert _loss(obj, turned) == pytest.approx(_loss(obj, batch), rel=1e-6)
