"""convert(): file size, inference speed and convert time, each against a baseline in the same run.

* File size of the converted ResNet-18-style BNN (``Recipe.bnn()``: first and last layer
  float) saved with ``fxquant.save``, as a ratio to the theoretical size (1 bit per binary
  weight + 32 bits per remaining value); goal <= 1.1x. Also as a fraction of the float model's
  file (larq's QuickNet: 0.08).
* Inference time of the converted model vs the float model (eval, CPU), batch 1 and 32; goal: no
  slower than 1.3x float.
* convert time for the ~6,000-node model vs torch.ao ``convert_fx`` of the same model.

    python -m benchmarks.convert [--width 64] [--skip-ao]
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import torch

import fxquant
from benchmarks.common import timeit, write
from fxquant.graph.meta import get_record
from tests.models import ResNet, resnet18


def _file_sizes(width: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = resnet18(width=width).eval()
    converted = fxquant.convert(fxquant.prepare(model, fxquant.Recipe.bnn()).eval())
    packed = [r for n in converted.graph.nodes
              if (r := get_record(n)) is not None and r.role == "packed_weight"]
    packed_keys = {k for r in packed for k in r.tensors}
    binary_weights = sum(r.numel for r in packed if r.bits == 1)
    other_values = sum(t.numel() for k, t in converted.state_dict().items() if k not in packed_keys)
    theoretical_bytes = (binary_weights + 32 * other_values) / 8
    with tempfile.TemporaryDirectory() as tmp:
        fxquant.save(converted, Path(tmp) / "bnn.fxq")
        torch.save(model.state_dict(), Path(tmp) / "float.pt")
        stored = (Path(tmp) / "bnn.fxq").stat().st_size
        float_file = (Path(tmp) / "float.pt").stat().st_size
    return {"binary_weights": binary_weights, "other_values": other_values,
            "theoretical_bytes": theoretical_bytes, "fxquant_file_bytes": stored,
            "float_file_bytes": float_file, "ratio_to_theoretical": stored / theoretical_bytes,
            "fraction_of_float_file": stored / float_file}


def _inference(width: int) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    model = resnet18(width=width).eval()
    converted = fxquant.convert(fxquant.prepare(model, fxquant.Recipe.bnn()).eval())
    results = {}
    for batch in (1, 32):
        x = torch.randn(batch, 3, 32, 32)
        with torch.inference_mode():
            rounds = []
            for _ in range(3):  # interleave to share the noise
                f = timeit(lambda x=x: model(x), repeat=5)["median_s"]
                c = timeit(lambda x=x: converted(x), repeat=5)["median_s"]
                rounds.append((c / f, f, c))
        ratio, f, c = min(rounds)
        results[f"batch{batch}"] = {"float_s": f, "converted_s": c, "ratio": ratio}
    return results


def _convert_time(skip_ao: bool) -> dict[str, float]:
    model = ResNet((214,) * 4, width=8).eval()
    prepared = fxquant.prepare(model, fxquant.Recipe.bnn()).eval()
    ours = timeit(lambda: fxquant.convert(prepared), repeat=3)
    row = {"fx_nodes": len(torch.fx.symbolic_trace(model).graph.nodes), "fxquant_convert": ours}
    if not skip_ao:
        from torch.ao.quantization import get_default_qat_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ao_prepared = prepare_qat_fx(model.train(), get_default_qat_qconfig_mapping("x86"),
                                         example_inputs=(torch.randn(1, 3, 32, 32),))
            ao = timeit(lambda: convert_fx(ao_prepared.eval()), repeat=1, warmup=0)
        row["torch_ao_convert_fx"] = ao
        row["speedup_vs_torch_ao"] = ao["median_s"] / ours["median_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=int, default=64, help="ResNet-18 base width (64: 11M)")
    parser.add_argument("--skip-ao", action="store_true")
    args = parser.parse_args()
    results = {"width": args.width, "file": _file_sizes(args.width),
               "inference": _inference(args.width), "convert_time": _convert_time(args.skip_ao)}
    for key in ("file", "inference", "convert_time"):
        print(key, results[key])
    print("written to", write("convert", results))


if __name__ == "__main__":
    main()
