"""One training step (forward + backward + SGD) of the Bi-Real-style ResNet-18 prepared with
``Recipe.bnn()``, as a ratio to the float model's step in the same run, plus peak memory.

The net is :class:`tests.models.BiRealResNet`: every binary conv reads the sign of a batch norm
output plus the shortcut, which takes both signs. (Earlier versions measured the float ResNet
of ``tests.models.resnet18``, whose binary convs read relu outputs: a constant +1 input.)

Time: the two steps alternate (float, bnn, float, ...) so both see the same machine noise; the
ratio is the median over pairs of bnn-step / float-step, with the page faults of each step.

Memory is measured three ways, each variant in its own fresh process:
* ``saved_bytes``: bytes of the distinct tensors autograd saves for backward (the activations the
  step must keep alive; exact and noise-free);
* ``peak_heap_delta``: the high-water mark of bytes malloc has handed out (glibc ``mallinfo2``,
  sampled after every ATen op) during one step, above the level before it: the CPU analogue of
  ``torch.cuda.max_memory_allocated``;
* ``peak_rss_delta``: growth of the process's peak resident set during its first step, which
  also counts pages the allocator keeps after a free (fragmentation).
Goals: <= 1.15x float time and <= 1.25x float peak memory.

    python -m benchmarks.qat_step [--width 32 --batch 32]
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.common import ROOT, write
from fxquant import Recipe, prepare, training
from tests.models import bireal_resnet18


def _model(variant: str, width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = bireal_resnet18(width=width)
    return model if variant == "float" else prepare(model, Recipe.bnn())


def _optimizer(model: torch.nn.Module, variant: str) -> torch.optim.Optimizer:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    if variant == "bnn":  # a BNN step includes larq's latent weight clipping
        training.LatentWeightClip(model, opt)
    return opt


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
          y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _batch(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)


def measure_memory(variant: str, width: int, batch: int) -> dict[str, float]:
    """Run in a fresh process: bytes saved for backward, peak heap and peak RSS growth."""
    model = _model(variant, width)
    opt = _optimizer(model, variant)
    x, y = _batch(batch)
    before = _reset_peak_rss()  # the process holds only the model, its optimizer and a batch
    _step(model, opt, x, y)
    peak = _status_kib("VmHWM")
    _step(model, opt, x, y)  # steady state: the gradients of the last step exist, as here
    heap_before = _heap_in_use()
    with _HeapPeak() as heap:
        _step(model, opt, x, y)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(model(x), y)
    return {"saved_bytes": float(sum(storages.values())), "peak_rss_delta_kib": peak - before,
            "peak_heap_delta_bytes": float(heap.peak - heap_before)}


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


_LIBC = ctypes.CDLL(ctypes.util.find_library("c"))
_LIBC.mallinfo2.restype = _MallInfo2


def _heap_in_use() -> int:
    """Bytes malloc has handed out and not taken back (heap chunks plus mmapped ones)."""
    info = _LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


class _HeapPeak(TorchDispatchMode):
    """Records the highest :func:`_heap_in_use` seen after any ATen op."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = _heap_in_use()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, _heap_in_use())
        return out


def _status_kib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return float(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak_rss() -> float:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS and return it (KiB)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=20, help="alternating float/bnn steps")
    parser.add_argument("--memory-only", choices=["float", "bnn"])
    args = parser.parse_args()
    if args.memory_only:
        print(json.dumps(measure_memory(args.memory_only, args.width, args.batch)))
        return
    x, y = _batch(args.batch)
    results: dict[str, Any] = {"width": args.width, "batch": args.batch, "image": [3, 32, 32]}
    models = {v: _model(v, args.width) for v in ("float", "bnn")}
    opts = {v: _optimizer(m, v) for v, m in models.items()}
    for v in models:  # warm up (first-call allocations, kernel selection)
        for _ in range(3):
            _step(models[v], opts[v], x, y)
    times: dict[str, list[float]] = {"float": [], "bnn": []}
    faults: dict[str, list[int]] = {"float": [], "bnn": []}
    for _ in range(args.pairs):  # alternate, so both see the same noise
        for v in ("float", "bnn"):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            _step(models[v], opts[v], x, y)
            times[v].append(time.perf_counter() - start)
            faults[v].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    for v in ("float", "bnn"):
        results[v] = {"median_s": statistics.median(times[v]), "min_s": min(times[v]),
                      "median_page_faults": statistics.median(faults[v])}
    for v in ("float", "bnn"):
        out = subprocess.run([sys.executable, "-m", "benchmarks.qat_step", "--memory-only", v,
                              "--width", str(args.width), "--batch", str(args.batch)],
                             cwd=ROOT, capture_output=True, text=True, check=True)
        results[v]["memory"] = json.loads(out.stdout.strip().splitlines()[-1])
    f, b = results["float"], results["bnn"]
    results["time_ratio"] = statistics.median(
        tb / tf for tb, tf in zip(times["bnn"], times["float"], strict=True))
    results["time_ratio_of_medians"] = b["median_s"] / f["median_s"]
    results["saved_bytes_ratio"] = b["memory"]["saved_bytes"] / f["memory"]["saved_bytes"]
    results["peak_heap_delta_ratio"] = (b["memory"]["peak_heap_delta_bytes"]
                                        / f["memory"]["peak_heap_delta_bytes"])
    results["peak_rss_delta_ratio"] = (b["memory"]["peak_rss_delta_kib"]
                                       / f["memory"]["peak_rss_delta_kib"])
    print(json.dumps({k: results[k] for k in (
        "time_ratio", "time_ratio_of_medians", "saved_bytes_ratio", "peak_heap_delta_ratio",
        "peak_rss_delta_ratio")}, indent=1))
    print("written to", write("qat_step", results))


if __name__ == "__main__":
    main()
