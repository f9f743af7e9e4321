"""End to end: a converted Bi-Real ResNet-18 on the packed binary ops against its float model.

The Bi-Real-style ResNet-18 of ``tests.models`` (``BiRealResNet``: CIFAR stem, 3x3 convs,
base width 64 as in the paper, 11.2M parameters) on CIFAR-sized 32x32 inputs, converted with
``Recipe.bnn()`` (first and last layer float): its 19 binary convolutions run as
``torch.ops.fxquant.binary_conv2d`` (pass ``lower_binary_layers``).

* inference time, eval, ``torch.inference_mode``, batch 1 and 16, at 1 thread and at the
  machine's default thread count: medians of interleaved runs (float, converted, float, ...),
  the ratio converted / float (goal <= 0.5);
* resident weight memory of the binary layers (every buffer they read) against one bit per
  weight, ``ceil(numel / 8)`` bytes (goal <= 1.1x);
* sizes: the ``fxquant.save`` file and the ``.pt2`` of ``torch.export.save`` (goal <= 1.2x the
  fxquant file), the float model's ``torch.save`` file for scale.

Whether the native kernels ran (``fxquant.kernels.native_available()``) is recorded: without
them the ops run the plain-PyTorch reference (a float convolution on the unpacked weight, which
unpacks on every call), so the time ratio is only meaningful with them.

    python -m benchmarks.binary_e2e [--width 64] [--repeat 7]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import warnings
from pathlib import Path

import torch

import fxquant
from benchmarks.common import timeit, write
from fxquant.graph.meta import get_record
from fxquant.kernels import native_available
from tests.models import BiRealResNet

BINARY_OPS = {torch.ops.fxquant.binary_conv2d.default, torch.ops.fxquant.binary_linear.default}


def _models(width: int) -> tuple[torch.nn.Module, torch.fx.GraphModule]:
    torch.manual_seed(0)
    model = BiRealResNet((2, 2, 2, 2), width=width).eval()
    for m in model.modules():  # trained-looking batch norms: the signs then vary
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = fxquant.convert(fxquant.prepare(model, fxquant.Recipe.bnn()).eval())
    return model, converted


def _memory(converted: torch.fx.GraphModule) -> dict[str, float]:
    calls = [n for n in converted.graph.nodes if n.op == "call_function"
             and n.target in BINARY_OPS]
    records = [get_record(n.args[1]) for n in calls]
    tensors = {k: converted.get_buffer(k) for r in records for k in r.tensors}
    resident = sum(t.numel() * t.element_size() for t in tensors.values())
    theoretical = sum(math.ceil(r.numel / 8) for r in records)
    return {"binary_layers": len(calls), "binary_weights": sum(r.numel for r in records),
            "resident_bytes": resident, "theoretical_bytes": theoretical,
            "ratio_to_theoretical": resident / theoretical,
            "float_copy_bytes": 4 * sum(r.numel for r in records)}


def _files(model: torch.nn.Module, converted: torch.fx.GraphModule) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        fxq, pt2, float_file = Path(tmp, "m.fxq"), Path(tmp, "m.pt2"), Path(tmp, "float.pt")
        fxquant.save(converted, fxq)
        x = torch.randn(1, 3, 32, 32)
        program = torch.export.export(converted, (x,))
        exact = torch.equal(program.module()(x), converted(x))
        torch.export.save(program, pt2)
        torch.save(model.state_dict(), float_file)
        sizes = {p.name: p.stat().st_size for p in (fxq, pt2, float_file)}
    ops = [n.target for n in program.graph.nodes if n.op == "call_function"]
    return {"fxquant_save_bytes": sizes["m.fxq"], "pt2_bytes": sizes["m.pt2"],
            "pt2_to_fxquant": sizes["m.pt2"] / sizes["m.fxq"],
            "float_state_dict_bytes": sizes["float.pt"],
            "pt2_keeps_binary_op": ops.count(torch.ops.fxquant.binary_conv2d.default),
            "pt2_equals_converted": exact}


def _times(model: torch.nn.Module, converted: torch.fx.GraphModule, repeat: int
           ) -> dict[str, dict[str, float]]:
    results = {}
    default_threads = torch.get_num_threads()
    for threads in sorted({1, default_threads}):
        torch.set_num_threads(threads)
        for batch in (1, 16):
            x = torch.randn(batch, 3, 32, 32)
            floats, ours = [], []
            with torch.inference_mode():
                assert torch.isfinite(converted(x)).all()
                for _ in range(repeat):  # interleaved: both see the same machine noise
                    floats.append(timeit(lambda x=x: model(x), repeat=1)["median_s"])
                    ours.append(timeit(lambda x=x: converted(x), repeat=1)["median_s"])
            f, c = statistics.median(floats), statistics.median(ours)
            results[f"threads{threads}_batch{batch}"] = {
                "float_s": f, "converted_s": c, "ratio": c / f}
    torch.set_num_threads(default_threads)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=int, default=64, help="base width (64: Bi-Real Net)")
    parser.add_argument("--repeat", type=int, default=7, help="interleaved runs per setting")
    args = parser.parse_args()
    model, converted = _models(args.width)
    x = torch.randn(4, 3, 32, 32)
    native = native_available()
    results = {"model": f"BiRealResNet((2, 2, 2, 2), width={args.width}), Recipe.bnn()",
               "input": "CIFAR-sized (N, 3, 32, 32)",
               "native_kernels": native,
               "converted_equals_prepared_eval": None,
               "memory": _memory(converted), "files": _files(model, converted),
               "inference": _times(model, converted, args.repeat)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = fxquant.prepare(model, fxquant.Recipe.bnn()).eval()
    results["converted_equals_prepared_eval"] = torch.equal(converted(x), prepared(x))
    for key in ("native_kernels", "converted_equals_prepared_eval", "memory", "files",
                "inference"):
        print(key, results[key])
    print("written to", write("binary_e2e", results))


if __name__ == "__main__":
    main()
