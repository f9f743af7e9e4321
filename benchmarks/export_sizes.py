"""Export sizes of a converted binary network against its ``fxquant.save`` file (goal <= 1.2x).

The Bi-Real-style ResNet-18 of ``tests.models`` (``Recipe.bnn()``: binary layers lowered onto
``torch.ops.fxquant.binary_conv2d`` with packed ``weight_bits``; float stem and head), at the
test suite's width 16 and at width 64 (the weights then dominate the files' fixed overhead):

* ``fxquant.save`` file (the baseline);
* ``.pt2`` of ``torch.export.save`` (example input of batch 1: the file holds it);
* ``.onnx`` written by ``fxquant.kernels.onnx.export`` with the dynamo and the legacy exporter;
* the float model's ``.onnx`` (dynamo exporter, one file), for scale.

Each export is also run and compared with the converted model: ``.pt2`` exactly, onnxruntime up
to float rounding (the float stem, batch norms and head round in its own order); onnxruntime's
batch-1 time of the binary and the float model's file is recorded too (it runs both as float
convolutions).

    python -m benchmarks.export_sizes        # needs pip install "fxquant[onnx]"
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import onnxruntime
import torch

import fxquant
from benchmarks.common import timeit, write
from fxquant.kernels import onnx as fxonnx
from tests.models import BiRealResNet


def _session(path: Path) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _onnx_error(path: Path, x: torch.Tensor, expected: torch.Tensor) -> float:
    got = torch.from_numpy(_session(path).run(None, {"x": x.numpy()})[0])
    return float((got - expected).abs().max() / expected.abs().max())


def _onnx_seconds(path: Path, x: torch.Tensor) -> float:
    session, feed = _session(path), {"x": x.numpy()}
    return timeit(lambda: session.run(None, feed), repeat=10, warmup=2)["median_s"]


def _sizes(width: int, tmp: Path) -> dict[str, object]:
    torch.manual_seed(0)
    model = BiRealResNet(width=width).eval()
    converted = fxquant.convert(fxquant.prepare(model, fxquant.Recipe.bnn()))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = converted(x)
    files = {name: tmp / f"{width}{suffix}" for name, suffix in
             [("fxquant_save", ".fxq"), ("pt2", ".pt2"), ("onnx_dynamo", "_dynamo.onnx"),
              ("onnx_legacy", "_legacy.onnx"), ("float_onnx", "_float.onnx")]}
    fxquant.save(converted, files["fxquant_save"])
    torch.export.save(torch.export.export(converted, (x,)), files["pt2"])
    fxonnx.export(converted, (x,), files["onnx_dynamo"], dynamo=True, input_names=["x"])
    fxonnx.export(converted, (x,), files["onnx_legacy"], dynamo=False, input_names=["x"])
    torch.onnx.export(model, (x,), files["float_onnx"], dynamo=True, external_data=False,
                      verbose=False, input_names=["x"])
    pt2_equal = torch.equal(torch.export.load(files["pt2"]).module()(x), expected)
    sizes = {name: path.stat().st_size for name, path in files.items()}
    base = sizes["fxquant_save"]
    return {"width": width, "bytes": sizes,
            "ratio_to_fxquant_save": {k: round(v / base, 3) for k, v in sizes.items()},
            "binary_layers": sum(n.endswith("weight_bits") for n, _ in converted.named_buffers()),
            "pt2_equals_converted": pt2_equal,
            "onnx_max_relative_error": {k: _onnx_error(files[k], x, expected)
                                        for k in ("onnx_dynamo", "onnx_legacy")},
            "onnxruntime_batch1_median_s": {k: _onnx_seconds(files[k], x)
                                            for k in ("onnx_dynamo", "float_onnx")}}


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    with tempfile.TemporaryDirectory() as tmp:
        results = [_sizes(width, Path(tmp)) for width in (16, 64)]
    for r in results:
        print(f"width {r['width']}: bytes {r['bytes']}\n  ratios {r['ratio_to_fxquant_save']}")
    print(write("export_sizes", {"goal": "every export <= 1.2x the fxquant.save file",
                                 "results": results}))


if __name__ == "__main__":
    main()
