"""prepare() time on residual models of ~1,500 and ~6,000 FX nodes.

Compared in the same run with (a) the floor for any FX pass: ``torch.fx.symbolic_trace`` (which
builds the GraphModule) of the same model, and (b) torch.ao's ``prepare_qat_fx`` with the default
QAT qconfig. Goals: prepare <= 1.5x the floor, >= 50x faster than prepare_qat_fx on the 6k model,
time(6k) / time(1.5k) <= 4.5.

    python benchmarks/prepare_speed.py [--skip-ao]
"""

from __future__ import annotations

import argparse
import warnings

import torch

from benchmarks.common import timeit, write
from fxquant import Recipe, prepare
from fxquant.graph.clone import clone_module
from fxquant.graph.pipeline import PREPARE
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
    """Where prepare's time goes: clone, trace (+ GraphModule), the passes, the final recompile."""
    copy = timeit(lambda: clone_module(model), repeat=3)["median_s"]
    traced = timeit(lambda: trace(model), repeat=3)["median_s"]

    def passes_only() -> None:
        gm = trace(clone_module(model))
        for p in PREPARE:
            gm = p(gm, Recipe.bnn())

    passes = timeit(passes_only, repeat=3)["median_s"] - copy - traced
    gm = trace(clone_module(model))
    for p in PREPARE:
        gm = p(gm, Recipe.bnn())
    recompile = timeit(gm.recompile, repeat=3)["median_s"]
    return {"clone_s": copy, "trace_and_graphmodule_s": traced, "passes_s": passes,
            "final_recompile_s": recompile, "prepared_nodes": len(gm.graph.nodes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-ao", action="store_true", help="skip torch.ao (slow: ~90 s)")
    args = parser.parse_args()
    results = {}
    for label, blocks in SIZES.items():
        model = ResNet((blocks,) * 4, width=8)
        nodes = len(torch.fx.symbolic_trace(model).graph.nodes)
        floor = timeit(lambda m=model: torch.fx.symbolic_trace(m), repeat=5)
        ours = timeit(lambda m=model: prepare(m, Recipe.bnn()), repeat=5)
        row = {"fx_nodes": nodes, "symbolic_trace": floor, "fxquant_prepare": ours,
               "ratio_to_trace_floor": ours["median_s"] / floor["median_s"],
               "breakdown": _breakdown(model)}
        if not args.skip_ao:
            ao = timeit(lambda m=model: _ao_prepare(m), repeat=1, warmup=0)
            row["torch_ao_prepare_qat_fx"] = ao
            row["speedup_vs_torch_ao"] = ao["median_s"] / ours["median_s"]
        results[label] = row
        print(label, {k: v for k, v in row.items()})
    results["scaling_6k_over_1.5k"] = (results["6k"]["fxquant_prepare"]["median_s"]
                                       / results["1.5k"]["fxquant_prepare"]["median_s"])
    print("scaling 6k/1.5k:", results["scaling_6k_over_1.5k"])
    print("written to", write("prepare_speed", results))


if __name__ == "__main__":
    main()
