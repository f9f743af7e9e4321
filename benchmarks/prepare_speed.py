"""prepare() time on residual models of ~1,500 and ~6,000 FX nodes.

Compared in the same run with (a) the floor for any FX pass: ``torch.fx.symbolic_trace`` (which
builds the GraphModule) of the same model, timed alternately with prepare (the ratio is the
median over pairs), and (b) torch.ao's ``prepare_qat_fx`` with the default QAT qconfig.
Goals: prepare <= 1.5x the floor, >= 50x faster than prepare_qat_fx on the 6k model,
time(6k) / time(1.5k) <= 4.5.

    python benchmarks/prepare_speed.py [--skip-ao]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Any

import torch

from benchmarks.common import timeit, write
from fxquant import Recipe, prepare
from fxquant.api import _paused_gc
from fxquant.graph.clone import clone_module
from fxquant.graph.pipeline import PREPARE, DeferredGraphModule
from fxquant.graph.tracer import trace
from tests.models import ResNet

SIZES = {"1.5k": 54, "6k": 214}  # BasicBlocks per stage -> 1,526 and 6,006 traced nodes


def _ao_prepare(model: torch.nn.Module) -> None:
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepare_qat_fx(model.train(), get_default_qat_qconfig_mapping("x86"),
                       example_inputs=(torch.randn(1, 3, 32, 32),))


def _breakdown(model: torch.nn.Module) -> dict[str, float]:
    """Where prepare's time goes, stage by stage, and the two costs no FX pass can avoid.

    ``trace_s`` is the trace with the GraphModule built but no code generated (prepare defers
    that to the end); ``codegen_s`` generates and compiles the prepared graph's code once.
    ``floor_codegen_s`` is the same for the float graph (the part of the floor that is code
    generation). ``lower_bound_s`` = tracing + generating the prepared code: what any pass that
    outputs this graph pays before inserting a single node.
    """
    stages: dict[str, list[float]] = {}
    for _ in range(3):
        with _paused_gc():  # as prepare runs
            t0 = time.perf_counter()
            copy = clone_module(model)
            t1 = time.perf_counter()
            gm = trace(copy, graph_module_class=DeferredGraphModule)
            t2 = time.perf_counter()
            for p in PREPARE:
                gm = p(gm, Recipe.bnn())
            t3 = time.perf_counter()
            gm.finish()
            t4 = time.perf_counter()
        for key, value in (("clone_s", t1 - t0), ("trace_s", t2 - t1), ("passes_s", t3 - t2),
                           ("codegen_s", t4 - t3)):
            stages.setdefault(key, []).append(value)
    result = {k: statistics.median(v) for k, v in stages.items()}
    floor_gm = torch.fx.symbolic_trace(model)
    result["floor_codegen_s"] = timeit(floor_gm.recompile, repeat=3)["median_s"]
    result["lower_bound_s"] = result["trace_s"] + result["codegen_s"]
    result["prepared_nodes"] = len(gm.graph.nodes)
    return result


def _alternate(model: torch.nn.Module, repeat: int) -> dict[str, Any]:
    """Floor and prepare timed alternately (both see the same noise): times and pair ratios."""
    floor_fn = lambda: torch.fx.symbolic_trace(model)  # noqa: E731
    ours_fn = lambda: prepare(model, Recipe.bnn())  # noqa: E731
    floor_fn(), ours_fn()  # warm up
    floor, ours = [], []
    for _ in range(repeat):
        for fn, times in ((floor_fn, floor), (ours_fn, ours)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    ratios = [o / f for o, f in zip(ours, floor, strict=True)]
    return {"symbolic_trace": {"min_s": min(floor), "median_s": statistics.median(floor)},
            "fxquant_prepare": {"min_s": min(ours), "median_s": statistics.median(ours)},
            "ratio_to_trace_floor": statistics.median(ratios)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-ao", action="store_true", help="skip torch.ao (slow: ~90 s)")
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    results: dict[str, Any] = {}
    for label, blocks in SIZES.items():
        model = ResNet((blocks,) * 4, width=8)
        row = {"fx_nodes": len(torch.fx.symbolic_trace(model).graph.nodes),
               **_alternate(model, args.repeat), "breakdown": _breakdown(model)}
        row["lower_bound_ratio_to_floor"] = (row["breakdown"]["lower_bound_s"]
                                             / row["symbolic_trace"]["median_s"])
        if not args.skip_ao:
            ao = timeit(lambda m=model: _ao_prepare(m), repeat=1, warmup=0)
            row["torch_ao_prepare_qat_fx"] = ao
            row["speedup_vs_torch_ao"] = ao["median_s"] / row["fxquant_prepare"]["median_s"]
        results[label] = row
        print(label, {k: v for k, v in row.items()})
    results["scaling_6k_over_1.5k"] = (results["6k"]["fxquant_prepare"]["median_s"]
                                       / results["1.5k"]["fxquant_prepare"]["median_s"])
    results["floor_scaling_6k_over_1.5k"] = (results["6k"]["symbolic_trace"]["median_s"]
                                             / results["1.5k"]["symbolic_trace"]["median_s"])
    print("scaling 6k/1.5k:", results["scaling_6k_over_1.5k"],
          "(the floor's own:", results["floor_scaling_6k_over_1.5k"], ")")
    print("written to", write("prepare_speed", results))


if __name__ == "__main__":
    main()
