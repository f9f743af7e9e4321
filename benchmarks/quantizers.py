"""Forward + backward time of every quantizer on a 16M-element float32 tensor, as a ratio to
``torch.nn.functional.hardtanh`` forward + backward of the same tensor in the same run (the
native clipped identity: the same memory traffic). Goals: ste_sign <= 1.5x, every quantizer <= 2.5x.

Baseline and quantizers are interleaved over several rounds and the best round's median is kept,
because these machines are noisy.

    python -m benchmarks.quantizers [--numel 16777216 --rounds 3]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.common import timeit, write
from fxquant.quantizers import (
    AffineKBitQuantize,
    ApproxSign,
    CeilSTE,
    ClampByLinear,
    ClampSTE,
    DoReFa,
    FloorSTE,
    KBitQuantize,
    MagnitudeAwareSign,
    ProgressiveSign,
    RoundSTE,
    SteHeaviside,
    StepQuantize,
    SteSign,
    SteTern,
    SwishSign,
    ste_sign,
)
from fxquant.wage import WAGEError, WAGEQuantizer, WAGEWeight


class _MaskSteSign(torch.nn.Module):
    """ste_sign as it treats an activation: a one-byte mask saved, not the input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ste_sign(x, save_input=False)


CASES: dict[str, Callable[[], torch.nn.Module]] = {
    "ste_sign": SteSign,  # the input here is a leaf, so ste_sign saves it (no mask)
    "ste_sign(mask)": _MaskSteSign,
    "approx_sign": ApproxSign,
    "swish_sign": SwishSign,
    "magnitude_aware_sign": MagnitudeAwareSign,
    "ste_heaviside": SteHeaviside,
    "ste_tern": SteTern,
    "ste_tern(twn)": lambda: SteTern(ternary_weight_networks=True),
    "progressive_sign(train)": ProgressiveSign,
    "dorefa(activations,2)": lambda: DoReFa(2, mode="activations"),
    "dorefa(weights,2)": lambda: DoReFa(2, mode="weights"),
    "round_ste": RoundSTE,
    "ceil_ste": CeilSTE,
    "floor_ste": FloorSTE,
    "clamp_ste": lambda: ClampSTE(-1.0, 1.0),
    "step_quantize": lambda: StepQuantize(0.25),
    "k_bit_quantize": lambda: KBitQuantize(4),
    "affine_k_bit_quantize": lambda: AffineKBitQuantize(4),
    "clamp_by_linear": ClampByLinear,
    "wage(8,8)": lambda: WAGEQuantizer(8, 8),
    "wage_weight(2)": lambda: WAGEWeight(2),
    "wage_error(8)": lambda: WAGEError(8),
}


def _fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
             g: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        leaf = x.detach().requires_grad_()
        fn(leaf).backward(g)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--numel", type=int, default=16 * 2**20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="case names to run")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.numel, generator=gen) * 1.5
    x4 = x.view(-1, 64, 16, 16)  # weight-shaped view for per-channel quantizers
    g = torch.randn(x4.shape, generator=gen)
    cases = {k: v for k, v in CASES.items() if not args.only or k in args.only}
    ratios: dict[str, list[float]] = {k: [] for k in cases}
    base_times = []
    for _ in range(args.rounds):
        for name, make in cases.items():
            base = timeit(_fwd_bwd(F.hardtanh, x4, g), repeat=3)["median_s"]
            q = make().train()
            t = timeit(_fwd_bwd(q, x4, g), repeat=3)["median_s"]
            ratios[name].append(t / base)
            base_times.append(base)
    best = {k: min(v) for k, v in ratios.items()}
    for name, r in best.items():
        print(f"{name:28s} {r:5.2f}x  (rounds: {', '.join(f'{v:.2f}' for v in ratios[name])})")
    print(f"hardtanh fwd+bwd median: {sorted(base_times)[len(base_times) // 2] * 1e3:.1f} ms")
    write("quantizers", {"numel": args.numel, "dtype": "float32", "rounds": args.rounds,
                         "ratio_to_hardtanh_fwd_bwd": best, "all_rounds": ratios,
                         "goals": {"ste_sign": 1.5, "every": 2.5}})


if __name__ == "__main__":
    main()
