"""Native packed binary kernels vs float: conv 3x3 on the LCE shapes and linear, 1 and 2 threads.

* ``torch.ops.fxquant.binary_conv2d`` (input packed on the fly, xor + popcount, scale) against
  float ``F.conv2d`` of the same shape, on Larq Compute Engine's benchmark shapes
  (N, H, W, Cin, Cout = 1,32,32,256,256 / 1,56,56,64,64 / 8,16,16,512,512; 3x3, pad 1, stride
  1). Goal <= 0.4x float on every shape (aim 0.25x); LCE's own binary conv takes 0.18-0.44x a
  float TFLite conv on this machine (issue #12), recorded beside ours.
* ``torch.ops.fxquant.binary_linear`` against ``F.linear``: 1x4096 by 4096x4096 (GEMV) and
  batch 64. Goal <= 0.3x.
* Timing: float and binary alternate, ``--rounds`` rounds of ``--repeat`` calls each; the
  medians of the round medians are reported, and the ratio is the median of the per-round
  ratios (so both sides share the machine's noise).
* Physical limit: binary multiply-accumulates per second (one xor + popcount bit) against
  popcount width x threads x clock, the clock read from /proc/cpuinfo (nominal, "cpu MHz"; turbo
  may run higher) and one popcount instruction per core per cycle (AVX-512 VPOPCNTQ: 512 bits;
  AVX2: 256; popcnt / portable: 64).
* Micro-kernels: every instruction set this CPU has, forced with FXQUANT_BINARY_ISA, 1 thread.

    python -m benchmarks.binary_kernels [--rounds 5] [--repeat 5] [--plot docs/images/...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import ROOT, write
from fxquant.kernels import _native, pack_binary_weight

CONV_SHAPES = [(1, 32, 32, 256, 256), (1, 56, 56, 64, 64), (8, 16, 16, 512, 512)]
LINEAR_SHAPES = [(1, 4096, 4096), (64, 4096, 4096)]
LCE_RATIO = {"min": 0.18, "max": 0.44, "what": "LCE binary conv / float TFLite conv, same "
             "shapes, 1 and 2 threads, this machine (issue #12)"}
POPCOUNT_BITS = {"avx512": 512, "avx2": 256, "popcnt": 64, "portable": 64}
GOALS = {"conv": 0.4, "conv_aim": 0.25, "linear": 0.3}


def _clock_hz() -> tuple[float, str]:
    try:
        mhz = [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith("cpu MHz")]
        return max(mhz) * 1e6, "/proc/cpuinfo cpu MHz (nominal; turbo may be higher)"
    except (OSError, ValueError, IndexError):
        return 2.3e9, "assumed 2.3 GHz (/proc/cpuinfo unreadable)"


def _median_call(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _compare(float_fn: Any, binary_fn: Any, rounds: int, repeat: int) -> dict[str, float]:
    float_fn(), binary_fn(), float_fn(), binary_fn()  # warm up
    floats, binaries = [], []
    for _ in range(rounds):
        floats.append(_median_call(float_fn, repeat))
        binaries.append(_median_call(binary_fn, repeat))
    return {"float_s": statistics.median(floats), "binary_s": statistics.median(binaries),
            "ratio": statistics.median(b / f for b, f in zip(binaries, floats, strict=True)),
            "best_ratio": min(b / f for b, f in zip(binaries, floats, strict=True))}


def _conv_case(shape: tuple[int, ...]) -> tuple[Any, Any, int]:
    n, h, w, cin, cout = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, cin, h, w, generator=g)
    weight = torch.where(torch.rand(cout, cin, 3, 3, generator=g) < 0.5, 1.0, -1.0)
    bits, scale = pack_binary_weight(weight)
    op = torch.ops.fxquant.binary_conv2d
    return (lambda: F.conv2d(x, weight, None, 1, 1),
            lambda: op(x, bits, scale, None, [1, 1], [1, 1], [1, 1], 1),
            n * h * w * cout * cin * 9)


def _linear_case(shape: tuple[int, ...]) -> tuple[Any, Any, int]:
    rows, inp, out = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, inp, generator=g)
    weight = torch.where(torch.rand(out, inp, generator=g) < 0.5, 1.0, -1.0)
    bits, scale = pack_binary_weight(weight)
    op = torch.ops.fxquant.binary_linear
    return lambda: F.linear(x, weight), lambda: op(x, bits, scale, None), rows * inp * out


def run(rounds: int, repeat: int) -> dict[str, Any]:
    if not _native.available():
        raise SystemExit(f"native kernels unavailable: {_native.unavailable_reason()}")
    isa = _native.isa()
    clock, clock_source = _clock_hz()
    cases = [("conv", s, *_conv_case(s)) for s in CONV_SHAPES]
    cases += [("linear", s, *_linear_case(s)) for s in LINEAR_SHAPES]
    rows = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for kind, shape, float_fn, binary_fn, macs in cases:
                row = {"kind": kind, "shape": list(shape), "threads": threads, "isa": isa,
                       **_compare(float_fn, binary_fn, rounds, repeat)}
                peak = POPCOUNT_BITS[isa] * threads * clock
                row["binary_macs_per_s"] = macs / row["binary_s"]
                row["fraction_of_peak"] = row["binary_macs_per_s"] / peak
                row["goal"] = GOALS[kind]
                row["meets_goal"] = row["ratio"] <= GOALS[kind]
                rows.append(row)
                print(f"{kind:6s} {shape!s:22s} {threads} thr  float {row['float_s'] * 1e3:8.3f} "
                      f"ms  binary {row['binary_s'] * 1e3:7.3f} ms  ratio {row['ratio']:.3f}  "
                      f"{row['fraction_of_peak']:.1%} of peak")
        torch.set_num_threads(1)
        per_isa = []
        for name in _native._build().isas():
            os.environ["FXQUANT_BINARY_ISA"] = name
            try:
                for shape, (float_fn, binary_fn, macs) in zip(
                        CONV_SHAPES, map(_conv_case, CONV_SHAPES), strict=True):
                    result = _compare(float_fn, binary_fn, max(2, rounds // 2), 3)
                    per_isa.append({"isa": name, "shape": list(shape), **result,
                                    "binary_macs_per_s": macs / result["binary_s"]})
                    print(f"  {name:8s} {shape!s:22s} ratio {result['ratio']:.3f}")
            finally:
                del os.environ["FXQUANT_BINARY_ISA"]
    finally:
        torch.set_num_threads(before)
    return {"isa": isa, "clock_hz": clock, "clock_source": clock_source,
            "peak_model": "popcount bits per instruction x threads x clock, one popcount per "
                          "core per cycle (xor and add share the vector ports, so the kernel's "
                          "own ceiling is lower)",
            "lce_ratio": LCE_RATIO, "goals": GOALS, "rows": rows, "conv_1_thread_per_isa": per_isa}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"{r['kind']} {'x'.join(map(str, r['shape']))}" for r in rows if r["threads"] == 1]
    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=90)
    width = 0.2
    for k, (threads, side, hatch) in enumerate([(1, "float", ""), (1, "binary", ""),
                                                (2, "float", "//"), (2, "binary", "//")]):
        values = [r[f"{side}_s"] * 1e3 for r in rows if r["threads"] == threads]
        ax.bar([i + (k - 1.5) * width for i in range(len(values))], values, width,
               label=f"{side}, {threads} thread{'s' if threads > 1 else ''}", hatch=hatch,
               color="tab:gray" if side == "float" else "tab:blue", edgecolor="white")
    ax.set_yscale("log")
    ax.set_ylabel("time per call (ms, log)")
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_title(f"fxquant binary ops ({result['isa']}) vs float F.conv2d / F.linear")
    ax.legend(fontsize=8, ncols=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--plot", type=Path, default=ROOT / "docs/images/binary_kernels.png")
    args = parser.parse_args()
    result = run(args.rounds, args.repeat)
    print(write("binary_kernels", result))
    try:
        plot(result, args.plot)
        print(args.plot)
    except ImportError:
        print("matplotlib missing (pip install -e '.[docs]'): no plot")


if __name__ == "__main__":
    main()
