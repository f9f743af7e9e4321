"""DDP with real processes: 2 gloo ranks train a prepared model exactly as one process does.

The oracle of every test is the same training in this (the test's) process, without any process
group, on the global batch: with a mean loss, DDP's averaged gradient is the global batch's, so
models without batch norm must end equal (to float rounding of the gradient sums), and the two
ranks must end bit-identical. The training helpers (LatentWeightClip, DelayedQuantization,
ProgressiveSignScheduler) run on every rank, as a DDP script runs them.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant import training
from fxquant.quantizers import ProgressiveSign, get_progressive_sign_scale, sign
from fxquant.quantizers import set_progressive_sign_scale as set_scale

STEPS = 6


def make_model() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights in every process
    return nn.Sequential(nn.Linear(8, 16), nn.Hardtanh(), nn.Linear(16, 16), nn.Hardtanh(),
                         nn.Linear(16, 16), nn.Hardtanh(), nn.Linear(16, 4))


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 8, generator=gen), torch.randint(0, 4, (16,), generator=gen))
            for _ in range(STEPS)]


RECIPES = {
    "bnn": fxquant.Recipe.bnn(),
    "progressive_sign": fxquant.Recipe(weight=ProgressiveSign(), input=ProgressiveSign()),
}


def train(recipe_name: str, rank: int = 0, world_size: int = 1) -> dict:
    """Train on this rank's share of each global batch; DDP when ``world_size > 1``."""
    prepared = fxquant.prepare(make_model(), RECIPES[recipe_name])
    model = (nn.parallel.DistributedDataParallel(prepared) if world_size > 1 else prepared)
    opt = torch.optim.Adam(prepared.parameters(), lr=0.05)
    training.LatentWeightClip(prepared, opt)
    delay = training.DelayedQuantization(prepared, start_step=2)
    scheduler = (training.ProgressiveSignScheduler(4, gm=prepared)
                 if recipe_name == "progressive_sign" else None)
    enabled, scales = [], []
    for x, y in global_batches():
        share = len(x) // world_size
        x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        enabled.append(prepared.get_submodule("2_weight_quantizer").enabled)
        scales.append(get_progressive_sign_scale())
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        delay.step()
        if scheduler is not None:
            scheduler.step()
    return {"state": {k: v.detach().clone() for k, v in prepared.state_dict().items()},
            "enabled": enabled, "scales": scales}


def _train_rank(rank: int, world_size: int, recipe_name: str) -> dict:
    return train(recipe_name, rank, world_size)


@pytest.mark.parametrize("recipe_name", sorted(RECIPES))
def test_ddp_ranks_stay_identical_and_equal_one_process_on_the_global_batch(ranks, recipe_name):
    results = ranks.run(_train_rank, recipe_name)
    scale = get_progressive_sign_scale()
    try:
        alone = train(recipe_name)
    finally:
        set_scale(scale)
    rank0, rank1 = results
    assert rank0["state"].keys() == rank1["state"].keys() == alone["state"].keys()
    for key, value in alone["state"].items():
        assert torch.equal(rank0["state"][key], rank1["state"][key]), key
        torch.testing.assert_close(rank0["state"][key], value, rtol=0, atol=1e-5, msg=key)
        assert not torch.equal(value, make_model().state_dict()[key]), f"{key} did not train"
    # the helpers acted alike everywhere: quantizers switched on at step 2, latents clipped
    assert rank0["enabled"] == rank1["enabled"] == alone["enabled"] == [False, False] + [True] * 4
    assert rank0["state"]["2.weight"].abs().max() <= 1.0
    if recipe_name == "progressive_sign":
        assert rank0["scales"] == rank1["scales"] == alone["scales"] == [0, .25, .5, .75, 1, 1]


def _summaries(rank: int, world_size: int) -> tuple[str, str]:
    prepared = fxquant.prepare(make_model(), fxquant.Recipe.bnn())
    ddp = nn.parallel.DistributedDataParallel(prepared)
    x = torch.randn(2, 8)
    return fxquant.summary(ddp), fxquant.summary(ddp, (x,))


def test_summary_of_a_ddp_model_is_that_of_the_model_inside(ranks):
    without, with_inputs = ranks.run(_summaries)[0]
    alone = fxquant.prepare(make_model(), fxquant.Recipe.bnn())
    assert without == fxquant.summary(alone)
    assert with_inputs == fxquant.summary(alone, (torch.randn(2, 8),))
    assert "?" not in with_inputs.splitlines()[2]  # the shapes were recorded


# ------------------------------------------------------------------------------------------------
# ProgressiveSign's process-wide scale is not inherited by a new process


def _global_scale_in_a_new_process() -> tuple[float, list[str], list[str]]:
    """Runs in a freshly spawned process: train forwards without and with a scheduler."""
    gm = fxquant.prepare(make_model(), RECIPES["progressive_sign"])
    with warnings.catch_warnings(record=True) as unset:
        warnings.simplefilter("always")
        gm(torch.randn(4, 8))
        gm(torch.randn(4, 8))
    seen = get_progressive_sign_scale()
    training.ProgressiveSignScheduler(4, gm=gm)
    with warnings.catch_warnings(record=True) as scheduled:
        warnings.simplefilter("always")
        gm(torch.randn(4, 8))
    return seen, [str(w.message) for w in unset], [str(w.message) for w in scheduled]


def _call(fn, results) -> None:
    results.put(fn())


def test_a_spawned_process_does_not_inherit_the_scale_and_says_so():
    import torch.multiprocessing as mp

    scale = get_progressive_sign_scale()
    set_scale(0.5)  # the parent's value: the child does not see it
    try:
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        child = ctx.Process(target=_call, args=(_global_scale_in_a_new_process, results))
        child.start()
        seen, unset, scheduled = results.get(timeout=60)
        child.join(timeout=10)
    finally:
        set_scale(scale)
    assert seen == 0.0
    assert len(unset) == 1 and "nothing has set in this process" in unset[0]  # once per process
    assert "ProgressiveSignScheduler" in unset[0] and "every rank" in unset[0]
    assert scheduled == []


class TestUnsetGlobalScaleWarning:
    @pytest.fixture
    def fresh_process(self, monkeypatch):
        """This process as a new one sees it: the scale never set, never warned about."""
        monkeypatch.setattr(sign, "_progressive_sign_scale", 0.0)
        monkeypatch.setattr(sign, "_progressive_sign_scale_set", False)
        monkeypatch.setattr(sign, "_warned_unset_scale", False)

    def test_warns_once_when_training_reads_a_scale_nobody_set(self, fresh_process):
        q = ProgressiveSign()
        x = torch.tensor([-2.0, -0.25, 0.0, 0.5])
        with pytest.warns(UserWarning, match="nothing has set in this process") as caught:
            y = q(x)
            q(x)
        assert len(caught) == 1
        assert caught[0].filename == __file__  # points at the caller's line
        assert torch.equal(y, x.clamp(-1, 1))  # scale 0: hardtanh, as before

    @pytest.mark.parametrize("how", ["set", "scheduler"])
    def test_silent_once_the_scale_was_set_in_this_process(self, fresh_process, how):
        if how == "set":
            set_scale(0.0)
        else:
            training.ProgressiveSignScheduler(10)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ProgressiveSign()(torch.randn(5))

    @pytest.mark.parametrize("q", [ProgressiveSign(use_global_scaling=False),
                                   ProgressiveSign().eval()], ids=["own_scale", "eval"])
    def test_silent_where_the_global_scale_is_not_read_for_training(self, fresh_process, q):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            q(torch.randn(5))
