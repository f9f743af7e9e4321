"""FSDP2 ``fully_shard`` per block of a model prepared with ``blocks=`` (2 gloo ranks).

Oracle: the same prepared model trained in this one process on the global batch (both ranks'
halves together). The model has no batch norm, so the global-batch gradient is the average of
the ranks' gradients, which is what FSDP's reduce-scatter computes: equality is defined up to
float rounding of that average (a different order of additions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import fxquant


class Residual(nn.Module):
    """``x + conv2(hardtanh(conv1(x)))``: a block with two binary convolutions, no batch norm."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.hardtanh(self.conv1(x)))


class Net(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.body = nn.Sequential(Residual(width), Residual(width))
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        x = self.body(F.hardtanh(self.stem(x)))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _prepared() -> nn.Module:
    torch.manual_seed(0)
    return fxquant.prepare(Net(), fxquant.Recipe.bnn(), blocks=[Residual])


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 4, (8,), generator=gen))
            for _ in range(2)]


def _train(model: nn.Module, rank: int, world_size: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in _batches():
        part = x.shape[0] // world_size
        x, y = x[rank * part:(rank + 1) * part], y[rank * part:(rank + 1) * part]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _sharded_per_block(rank: int, world_size: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    prepared = _prepared()
    for block in fxquant.blocks(prepared).values():
        fully_shard(block)
    fully_shard(prepared)
    _train(prepared, rank, world_size)
    params = {n: p.full_tensor().detach() for n, p in prepared.named_parameters()}
    prepared.eval()
    x = _batches()[0][0]
    out = prepared(x).detach()
    converted = fxquant.convert(prepared)  # a collective: every rank gathers the shards
    return {"params": params, "eval": out, "converted": converted(x).detach()}


def test_fsdp2_per_block_equals_one_process_on_the_global_batch(ranks):
    results = ranks.run(_sharded_per_block)
    expected = _prepared()
    _train(expected, 0, 1)
    expected.eval()
    x = _batches()[0][0]
    for got in results:
        assert got["params"].keys() == dict(expected.named_parameters()).keys()
        for name, p in expected.named_parameters():
            torch.testing.assert_close(got["params"][name], p.detach(), rtol=1e-5, atol=1e-6,
                                       msg=name)
        torch.testing.assert_close(got["eval"], expected(x).detach(), rtol=1e-5, atol=1e-5)
        assert torch.equal(got["converted"], got["eval"])
    assert torch.equal(results[0]["params"]["body.0.conv1.weight"],
                       results[1]["params"]["body.0.conv1.weight"])
