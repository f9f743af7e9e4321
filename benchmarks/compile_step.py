"""torch.compile (inductor) of a binary network: the QAT training step against the float step, and
converted inference against float inference, each as a ratio measured in the same run.

The net is :class:`tests.models.BiRealResNet` (float stem and head, binary convs reading the sign
of a batch norm output plus the shortcut) on CIFAR-shaped inputs. Four training steps
(forward + cross entropy + backward + SGD) alternate: float eager, ``Recipe.bnn()`` eager, float
compiled, bnn compiled; the bnn steps include larq's latent weight clip (``LatentWeightClip``,
outside the compiled region, as the optimizer is). Then inference at batch ``--infer-batch``
alternates float eager, ``fxquant.convert(bnn)`` eager, float compiled and converted compiled
(eval mode, no grad). Each ratio is the median over rounds of the per-round ratio, of wall
time and of process CPU time (the steadier one on a loaded machine), with the ratio of the
minimum wall times beside them.

Goals (issue #11): compiled QAT step <= 1.15x the compiled float step; compiled converted
inference <= compiled float inference. Graph breaks are counted (they must be 0).

    python -m benchmarks.compile_step [--width 16 --batch 32 --rounds 15]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch._dynamo
import torch.nn.functional as F
from torch._dynamo.utils import counters

from benchmarks.common import write
from fxquant import Recipe, convert, prepare, training
from tests.models import bireal_resnet18


def _models(width: int) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    float_model = bireal_resnet18(width=width)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bnn = prepare(float_model, Recipe.bnn())
    return {"float": float_model, "bnn": bnn}


def _step_fn(model: torch.nn.Module, run: Callable[..., torch.Tensor], clip: bool,
             x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    if clip:
        training.LatentWeightClip(model, opt)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(run(x), y).backward()
        opt.step()

    return step


def _alternate(fns: dict[str, Callable[[], Any]], rounds: int
               ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process CPU seconds of each call, the variants alternating, so every variant
    sees the same machine noise. CPU time (both threads) is the steadier figure on a loaded
    machine, where wall time also counts the time other processes held the cores."""
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def _ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))


def _summary(wall: dict[str, list[float]], cpu: dict[str, list[float]]
             ) -> dict[str, dict[str, float]]:
    return {name: {"median_s": statistics.median(t), "min_s": min(t),
                   "median_cpu_s": statistics.median(cpu[name])} for name, t in wall.items()}


def _ratios(wall: dict[str, list[float]], cpu: dict[str, list[float]],
            pairs: dict[str, tuple[str, str]]) -> dict[str, dict[str, float]]:
    """For each named pair: the median of the per-round ratios of wall time and of CPU time,
    and the ratio of the minimum wall times."""
    return {key: {"wall": _ratio(wall, num, den), "cpu": _ratio(cpu, num, den),
                  "min_wall": min(wall[num]) / min(wall[den])}
            for key, (num, den) in pairs.items()}


def _compile_timed(fn: Callable[[], Any], warmup: int) -> float:
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    return time.perf_counter() - start


def measure_training(width: int, batch: int, rounds: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
    eager = _models(width)
    compiled_src = _models(width)
    steps = {
        "float_eager": _step_fn(eager["float"], eager["float"], False, x, y),
        "bnn_eager": _step_fn(eager["bnn"], eager["bnn"], True, x, y),
        "float_compiled": _step_fn(compiled_src["float"], torch.compile(compiled_src["float"]),
                                   False, x, y),
        "bnn_compiled": _step_fn(compiled_src["bnn"], torch.compile(compiled_src["bnn"]), True,
                                 x, y),
    }
    counters.clear()
    first_calls = {name: _compile_timed(fn, 3) for name, fn in steps.items()}
    breaks = sum(counters["graph_break"].values())
    wall, cpu = _alternate(steps, rounds)
    return {"batch": batch, "graph_breaks": breaks, "first_three_steps_s": first_calls,
            "steps": _summary(wall, cpu), **_ratios(wall, cpu, {
                "qat_compiled_over_float_compiled": ("bnn_compiled", "float_compiled"),
                "qat_eager_over_float_eager": ("bnn_eager", "float_eager"),
                "qat_compiled_over_qat_eager": ("bnn_compiled", "bnn_eager"),
                "float_compiled_over_float_eager": ("float_compiled", "float_eager")})}


def measure_inference(width: int, batch: int, rounds: int) -> dict[str, Any]:
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    models = _models(width)
    float_model = models["float"].eval()
    converted = convert(models["bnn"])
    runs = {"float_eager": float_model, "converted_eager": converted,
            "float_compiled": torch.compile(float_model),
            "converted_compiled": torch.compile(converted)}
    counters.clear()

    def infer(model: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                model(x)
        return run

    fns = {name: infer(model) for name, model in runs.items()}
    first_calls = {name: _compile_timed(fn, 2) for name, fn in fns.items()}
    breaks = sum(counters["graph_break"].values())
    wall, cpu = _alternate(fns, rounds)
    return {"batch": batch, "graph_breaks": breaks, "first_two_calls_s": first_calls,
            "calls": _summary(wall, cpu), **_ratios(wall, cpu, {
                "converted_compiled_over_float_compiled": ("converted_compiled",
                                                           "float_compiled"),
                "converted_eager_over_float_eager": ("converted_eager", "float_eager")})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--infer-batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    results: dict[str, Any] = {"model": "tests.models.bireal_resnet18", "width": args.width,
                               "image": [3, 32, 32], "backend": "inductor"}
    results["training"] = measure_training(args.width, args.batch, args.rounds)
    torch._dynamo.reset()
    results["inference"] = measure_inference(args.width, args.infer_batch, args.rounds)
    t, i = results["training"], results["inference"]
    qat, infer = t["qat_compiled_over_float_compiled"], i["converted_compiled_over_float_compiled"]
    results["goals"] = {  # judged on both clocks: met only where both agree
        "qat_compiled_le_1.15x_float_compiled": qat["wall"] <= 1.15 and qat["cpu"] <= 1.15,
        "converted_compiled_le_float_compiled": infer["wall"] <= 1.0 and infer["cpu"] <= 1.0,
        "zero_graph_breaks": t["graph_breaks"] == 0 and i["graph_breaks"] == 0,
    }
    for part, data in (("training", t), ("inference", i)):
        for key, value in data.items():
            if key.endswith(("_over_float_compiled", "_over_float_eager", "_over_qat_eager")):
                print(f"{part:9} {key}: " + ", ".join(f"{k} {v:.3f}" for k, v in value.items()))
        print(f"{part:9} graph_breaks: {data['graph_breaks']}")
    print("goals:", results["goals"])
    print("written to", write("compile_step", results))


if __name__ == "__main__":
    main()
