"""Loss normalisation with atom-budget batches of different sizes per rank: the DDP gradient must equal
the gradient of the mean over all atoms of all ranks (2 gloo processes vs one process on the union)."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from scd_train.trainer import global_mean_loss

SIZES = (3, 11)


def _data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(SIZES[rank], 4, generator=g, dtype=torch.float64)
    return x, torch.randn(SIZES[rank], generator=g, dtype=torch.float64)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 1).double()


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = DistributedDataParallel(_model())
    x, y = _data(rank)
    per_atom = (model(x).squeeze(-1) - y) ** 2
    loss, counts = global_mean_loss(per_atom.sum(), torch.tensor(float(len(y))), 2)
    loss.backward()
    if rank == 0:
        torch.save({"grad": model.module.weight.grad, "atoms": counts[0]}, out)
    dist.destroy_process_group()


def test_ddp_gradient_is_mean_over_all_atoms(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "grad.pt")
    mp.spawn(_worker, args=(port, out), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    model = _model()
    xs, ys = zip(*(_data(r) for r in range(2)), strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    ((model(x).squeeze(-1) - y) ** 2).mean().backward()
    assert float(ddp["atoms"]) == sum(SIZES)
    torch.testing.assert_close(ddp["grad"], model.weight.grad, rtol=1e-12, atol=1e-12)
    rank_means = [((model(a).squeeze(-1) - b) ** 2).mean() for a, b in zip(xs, ys, strict=True)]
    assert abs(float(sum(rank_means) / 2) - float(((model(x).squeeze(-1) - y) ** 2).mean())) > 1e-3, \
        "the test data must distinguish a mean of rank means from the global mean"
