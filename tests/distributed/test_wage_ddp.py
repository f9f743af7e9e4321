"""WAGE under DDP and FSDP2 equals WAGE on the global batch (2 gloo ranks against this process).

Two things make it so: the error quantizers scale by the largest error over all ranks (an
all-reduce MAX in their backward, ``sync_scale``), and ``WAGEOptimizer``'s stochastic rounding
draws the same numbers on every rank (its generator is broadcast from rank 0 at construction;
under FSDP2 it rounds each whole gradient and keeps the rank's shard).
The oracle is the same run without a process group on the whole batch, and, for the error
scale alone, QE written out by hand on the concatenated gradient.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant import _distributed, wage

STEPS = 5
BATCH = 16


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 32, bias=False), nn.ReLU(),
                         nn.Linear(32, 32, bias=False), nn.ReLU(),
                         nn.Linear(32, 4, bias=False))


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    return [(torch.rand(BATCH, 12, generator=gen) * 2 - 1,
             torch.randint(0, 4, (BATCH,), generator=gen)) for _ in range(STEPS)]


def train_wage(rank: int = 0, world_size: int = 1, optimizer_seed: int = 100,
               wrap: str = "ddp") -> dict:
    """QPyTorch-style WAGE (2-8-8-8, stochastic gradient rounding) on this rank's batch share."""
    prepared = fxquant.prepare(make_model(), fxquant.Recipe.wage())
    wage.initialize(prepared, generator=torch.Generator().manual_seed(0))
    model = prepared
    if world_size > 1 and wrap == "ddp":
        model = nn.parallel.DistributedDataParallel(prepared)
    elif world_size > 1:
        from torch.distributed.fsdp import fully_shard

        model = fully_shard(prepared)  # its parameters become shards: the optimizer comes after
    opt = wage.WAGEOptimizer(prepared, lr=8.0, grad_mode="stochastic",
                             generator=torch.Generator().manual_seed(optimizer_seed))
    for x, y in batches():
        share = len(x) // world_size
        x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    state = _distributed.full_state_dict(prepared, "test")
    return {k: v.detach().clone() for k, v in state.items()}


def _train_rank(rank: int, world_size: int, wrap: str) -> dict:
    # each rank seeds its optimizer differently: construction gives them all rank 0's stream
    return train_wage(rank, world_size, optimizer_seed=100 + rank, wrap=wrap)


@pytest.mark.parametrize("wrap", ["ddp", "fsdp"])
def test_wage_data_parallel_equals_wage_on_the_global_batch_bit_for_bit(ranks, wrap):
    rank0, rank1 = ranks.run(_train_rank, wrap)
    alone = train_wage(optimizer_seed=100)
    start = fxquant.prepare(make_model(), fxquant.Recipe.wage())
    wage.initialize(start, generator=torch.Generator().manual_seed(0))
    for key, value in alone.items():
        assert torch.equal(rank0[key], rank1[key]), key
        assert torch.equal(rank0[key], value), key
        assert not torch.equal(value, start.state_dict()[key]), f"{key} did not train"


# ------------------------------------------------------------------------------------------------
# the error scale


def qe_by_hand(g: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """QE of QPyTorch: shift by 2**ceil(log2(max|g|)), round to nearest, clamp."""
    sigma = 2.0 ** -(bits - 1)
    shifted = g / 2.0 ** torch.ceil(torch.log2(g.abs().max()))
    return torch.clamp(torch.round(shifted / sigma) * sigma, -1 + sigma, 1 - sigma)


GRADIENTS = [torch.tensor([[0.013, -0.02], [0.004, 0.0]]),  # rank 0: small errors
             torch.tensor([[1.7, -0.3], [0.05, 2.9]])]  # rank 1: large ones


def _error_gradients(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    out = {}
    for name, q in [("synced", wage.WAGEError(8)),
                    ("local", wage.WAGEError(8, sync_scale=False)),
                    ("synced_wage", wage.WAGEQuantizer(8, 8))]:
        x = torch.zeros(2, 2, requires_grad=True)  # QA of 0 never clamps: no mask
        q(x).backward(GRADIENTS[rank])
        out[name] = x.grad
    return out


def test_error_scale_is_the_maximum_over_the_ranks(ranks):
    results = ranks.run(_error_gradients)
    whole = qe_by_hand(torch.cat(GRADIENTS))  # one process, both halves in one batch
    for rank, got in enumerate(results):
        assert torch.equal(got["synced"], whole[2 * rank:2 * rank + 2])
        assert torch.equal(got["synced_wage"], whole[2 * rank:2 * rank + 2])
        assert torch.equal(got["local"], qe_by_hand(GRADIENTS[rank]))
    assert not torch.equal(results[0]["local"], results[0]["synced"])  # rank 0 alone: its own max


def _optimizer_generators(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    prepared = fxquant.prepare(make_model(), fxquant.Recipe.wage())
    torch.manual_seed(rank)  # the global generators differ between ranks
    given = wage.WAGEOptimizer(prepared, generator=torch.Generator().manual_seed(10 + rank))
    default = wage.WAGEOptimizer(prepared)
    return {"given": torch.rand(4, generator=given.generator),
            "default": torch.rand(4, generator=default.generator),
            "global": torch.rand(4)}


def test_optimizer_generators_are_rank_zeros_on_every_rank(ranks):
    rank0, rank1 = ranks.run(_optimizer_generators)
    assert torch.equal(rank0["given"], rank1["given"])
    assert torch.equal(rank0["given"], torch.rand(4, generator=torch.Generator().manual_seed(10)))
    assert torch.equal(rank0["default"], rank1["default"])
    assert not torch.equal(rank0["global"], rank1["global"])  # the global streams were left alone


def test_a_single_process_keeps_the_given_generator_and_the_global_one():
    gen = torch.Generator().manual_seed(5)
    prepared = fxquant.prepare(make_model(), fxquant.Recipe.wage())
    assert wage.WAGEOptimizer(prepared, generator=gen).generator is gen
    assert wage.WAGEOptimizer(prepared).generator is None
