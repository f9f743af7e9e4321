"""convert / save / load / summary of DDP-wrapped and FSDP2-sharded prepared models (2 ranks).

Oracles: the distributed model's own eval forward (``convert(m)(x)`` equals ``m.eval()(x)``),
a file written by ``fxquant.save`` and read here by ``fxquant.load`` in a single process into a
fresh float model, and the summary of the same model prepared in one process.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant import _distributed


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Hardtanh(),
                         nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Hardtanh(),
                         nn.Linear(16, 4))


def sample_input() -> torch.Tensor:
    return torch.randn(6, 8, generator=torch.Generator().manual_seed(2))


def _train(model: nn.Module, prepared: nn.Module, rank: int, steps: int = 3) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(10 + rank)
    for _ in range(steps):
        x, y = torch.randn(8, 8, generator=gen), torch.randint(0, 4, (8,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _fsdp(prepared: nn.Module, per_layer: bool = False) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    if per_layer:  # shards on submodules too (nested FSDP classes); only gathered, not run
        for name in ("0", "3"):
            fully_shard(prepared.get_submodule(name))
    return fully_shard(prepared)


def _ddp_round_trip(rank: int, world_size: int, tmp: str) -> dict:
    prepared = fxquant.prepare(make_model(), fxquant.Recipe.bnn())
    ddp = nn.parallel.DistributedDataParallel(prepared)
    _train(ddp, prepared, rank)
    path = os.path.join(tmp, "ddp.fxq")
    fxquant.save(ddp, path)  # every rank calls; rank 0 writes
    mine = os.path.join(tmp, f"ddp_rank{rank}.fxq")
    fxquant.save(ddp, mine)  # a per-rank path shows who writes
    converted = fxquant.convert(ddp)
    fxquant.save(converted, os.path.join(tmp, "ddp_converted.fxq"))
    dist.barrier()
    prepared.eval()
    x = sample_input()
    return {"eval": prepared(x).detach(), "converted": converted(x).detach(),
            "wrote_own": os.path.exists(mine), "saw_shared": os.path.exists(path)}


def test_ddp_model_converts_saves_once_and_loads_in_one_process(ranks, tmp_path):
    rank0, rank1 = ranks.run(_ddp_round_trip, str(tmp_path))
    assert rank0["wrote_own"] and not rank1["wrote_own"]  # only rank 0 writes
    assert rank1["saw_shared"]  # after the barrier the file is there for everyone
    assert torch.equal(rank0["converted"], rank0["eval"])
    loaded = fxquant.load(tmp_path / "ddp.fxq", make_model()).eval()
    assert torch.equal(loaded(sample_input()), rank0["eval"])
    loaded_converted = fxquant.load(tmp_path / "ddp_converted.fxq", make_model())
    assert fxquant.is_converted(loaded_converted)
    assert torch.equal(loaded_converted(sample_input()), rank0["eval"])


def _fsdp_round_trip(rank: int, world_size: int, tmp: str) -> dict:
    prepared = fxquant.prepare(make_model(), fxquant.Recipe.bnn())
    model = _fsdp(prepared)
    _train(model, prepared, rank)
    assert _distributed.is_sharded(model)
    local = {k: tuple(v.to_local().shape) for k, v in model.state_dict().items()
             if k == "3.weight"}
    fxquant.save(model, os.path.join(tmp, "fsdp.fxq"))  # a collective: every rank
    x = sample_input()
    model.eval()
    with torch.no_grad():
        expected = model(x)  # FSDP's own forward; after it the root stays unsharded
    unsharded = not _distributed.is_sharded(model)
    converted = fxquant.convert(model)  # gathers if sharded: every rank calls it
    fxquant.save(converted, os.path.join(tmp, "fsdp_converted.fxq"))
    model.train()
    _train(model, prepared, rank, steps=1)  # FSDP still trains after convert and save
    return {"eval": expected, "converted": converted(x).detach(), "type": type(converted).__name__,
            "converted_sharded": _distributed.is_distributed(converted), "local": local,
            "unsharded": unsharded,
            "modules": sorted({type(m).__module__ for m in converted.modules()})}


def test_fsdp_model_is_gathered_for_convert_and_save(ranks, tmp_path):
    rank0, rank1 = ranks.run(_fsdp_round_trip, str(tmp_path))
    assert rank0["local"] == {"3.weight": (8, 16)}  # really sharded: half the rows per rank
    assert rank0["unsharded"]  # convert met FSDP's unsharded state (plain tensors, its hooks)
    for got in (rank0, rank1):
        assert torch.equal(got["converted"], got["eval"])
        assert not got["converted_sharded"] and not got["type"].startswith("FSDP")
        assert not any(m.startswith("torch.distributed") for m in got["modules"])
    for name in ("fsdp.fxq", "fsdp_converted.fxq"):
        loaded = fxquant.load(tmp_path / name, make_model()).eval()
        assert torch.equal(loaded(sample_input()), rank0["eval"]), name


def _per_layer_convert(rank: int, world_size: int) -> dict:
    prepared = fxquant.prepare(make_model(), fxquant.Recipe.bnn())
    plain = fxquant.convert(prepared)  # the same weights, never sharded
    model = _fsdp(prepared, per_layer=True)
    kinds = sorted({type(m).__name__ for m in model.modules() if type(m).__name__[:4] == "FSDP"})
    converted = fxquant.convert(model)
    x = sample_input()
    return {"kinds": kinds, "converted": converted(x).detach(), "plain": plain(x).detach(),
            "summary": fxquant.summary(model), "summary_plain": fxquant.summary(prepared)}


def test_nested_fully_shard_is_gathered_too(ranks):
    for got in ranks.run(_per_layer_convert):
        assert got["kinds"] == ["FSDPLinear", "FSDPSequential"]
        assert torch.equal(got["converted"], got["plain"])
        assert got["summary"] == got["summary_plain"]


def _summary_on_rank_zero_only(rank: int, world_size: int) -> str | None:
    prepared = fxquant.prepare(make_model(), fxquant.Recipe.bnn())
    model = _fsdp(prepared)
    text = fxquant.summary(model, (sample_input(),)) if rank == 0 else None  # no collective
    dist.barrier()
    return text


def test_summary_of_an_fsdp_model_needs_no_other_rank(ranks):
    text, _ = ranks.run(_summary_on_rank_zero_only, timeout=30)
    alone = fxquant.prepare(make_model(), fxquant.Recipe.bnn())
    assert text == fxquant.summary(alone, (sample_input(),))


def test_fsdp1_wrappers_are_refused_with_the_fix():
    """FSDP1 flattens parameters (and needs an accelerator to be built, so one is faked)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrapped = object.__new__(FullyShardedDataParallel)
    for who, call in [("convert", fxquant.convert), ("save", lambda m: fxquant.save(m, "x")),
                      ("summary", fxquant.summary)]:
        with pytest.raises(TypeError, match=f"^{who}: FullyShardedDataParallel .FSDP1.*"
                                            r"fully_shard\(model\)"):
            call(wrapped)
