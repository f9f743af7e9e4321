"""Draw the forward and gradient plots embedded in ``docs/quantizers/*.md``.

Usage, from the repository root::

    .venv/bin/pip install -e ".[docs]"      # matplotlib, once
    .venv/bin/python docs/plots.py          # writes docs/images/<name>.png
    .venv/bin/python docs/plots.py --out /tmp/plots --only ste_sign dorefa_weights

Every image has two panels: the forward ``y = q(x)`` and the gradient ``dL/dx`` obtained by autograd
with an upstream gradient of ones, on the float32 grid ``x = i / 1000`` for ``i = -2000 ... 2000``
(so -2, -1, -0.5, 0, 0.25, 0.5, 1, 2 are exact grid points). Quantizers whose result depends on
the whole tensor (TWN threshold, magnitude-aware scale, DoReFa weights, clamp_by_linear, shift, QG,
the WAGE error shift) see that grid as their tensor; the Markdown captions say what that gives.
Raw operations without autograd (fixed_point_quantize, QW, QG) get a forward panel only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path(__file__).resolve().parent / "images"


@dataclass(frozen=True)
class Curve:
    """One quantizer setting: a label and ``fn(x) -> y`` on a 1-d float32 tensor."""

    label: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    has_grad: bool = True


@dataclass(frozen=True)
class Figure:
    """One image: ``<name>.png`` with a title and one or more curves."""

    name: str
    title: str
    curves: list[Curve]
    notes: list[str] = field(default_factory=list)  # shown under the gradient panel


def grid() -> torch.Tensor:
    """x = i / 1000 for i in [-2000, 2000], in float32 (exact at the usual breakpoints)."""
    return (torch.arange(-2000, 2001, dtype=torch.float64) / 1000).float()


def evaluate(curve: Curve, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward values and, when the curve has a gradient, dL/dx for an upstream of ones."""
    if not curve.has_grad:
        with torch.no_grad():
            return curve.fn(x.clone()).detach(), None
    leaf = x.clone().requires_grad_(True)
    y = curve.fn(leaf)
    y.backward(torch.ones_like(y))
    return y.detach(), leaf.grad


def figures() -> list[Figure]:
    """Every plotted quantizer, grouped as in the documentation pages."""
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing fxquant
    from fxquant import quantizers as q
    from fxquant import wage

    def row(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """Apply ``fn`` to x as one row of a (1, N) tensor: one output channel."""
        return lambda x: fn(x.unsqueeze(0)).squeeze(0)

    def progressive(scale: float, training: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
        module = q.ProgressiveSign(use_global_scaling=False, initial_scale=scale)
        return module.train(training)

    return [
        # sign.md
        Figure("ste_sign", "ste_sign(x, clip_value)", [
            Curve("clip_value=1.0 (default)", q.ste_sign),
            Curve("clip_value=None (bitorch Sign)", lambda x: q.ste_sign(x, clip_value=None)),
        ]),
        Figure("approx_sign", "approx_sign(x)", [Curve("approx_sign", q.approx_sign)]),
        Figure("swish_sign", "swish_sign(x, beta)", [
            Curve("beta=5 (default)", q.swish_sign),
            Curve("beta=10", lambda x: q.swish_sign(x, beta=10.0)),
        ]),
        Figure("magnitude_aware_sign", "magnitude_aware_sign on one channel (x as a 1 x N row)", [
            Curve("clip_value=1.0", row(q.magnitude_aware_sign)),
        ], notes=["alpha = mean|x| over the row = 4002/4001"]),
        Figure("ste_heaviside", "ste_heaviside(x, clip_value)", [
            Curve("clip_value=1.0 (default)", q.ste_heaviside),
            Curve("clip_value=None", lambda x: q.ste_heaviside(x, clip_value=None)),
        ]),
        Figure("progressive_sign", "ProgressiveSign (per-instance scale)", [
            Curve("train, scale=0", progressive(0.0)),
            Curve("train, scale=0.05", progressive(0.05)),
            Curve("train, scale=0.1", progressive(0.1)),
            Curve("train, scale=0.5", progressive(0.5)),
            Curve("eval (any scale)", progressive(0.0, training=False)),
        ], notes=["gradient: identity in every mode"]),
        # ternary.md
        Figure("ste_tern", "ste_tern(x, threshold_value, ternary_weight_networks)", [
            Curve("threshold_value=0.1 (default)", q.ste_tern),
            Curve("threshold_value=0.5", lambda x: q.ste_tern(x, threshold_value=0.5)),
            Curve("TWN (Delta = 0.7 mean|x|)",
                  lambda x: q.ste_tern(x, ternary_weight_networks=True)),
        ], notes=["gradient independent of the threshold"]),
        # kbit.md
        Figure("round_ste", "round_ste(x)", [Curve("round_ste", q.round_ste)]),
        Figure("ceil_ste", "ceil_ste(x)", [Curve("ceil_ste", q.ceil_ste)]),
        Figure("floor_ste", "floor_ste(x)", [Curve("floor_ste", q.floor_ste)]),
        Figure("clamp_ste", "clamp_ste(x, min_value, max_value)", [
            Curve("[-1, 1]", lambda x: q.clamp_ste(x, -1.0, 1.0)),
            Curve("[-0.5, 1.5]", lambda x: q.clamp_ste(x, -0.5, 1.5)),
        ]),
        Figure("step_quantize", "step_quantize(x, step)", [
            Curve("step=0.5", lambda x: q.step_quantize(x, 0.5)),
            Curve("step=1.0", lambda x: q.step_quantize(x, 1.0)),
        ]),
        Figure("k_bit_quantize", "k_bit_quantize(x, k) (no clipping)", [
            Curve("k=1", lambda x: q.k_bit_quantize(x, 1)),
            Curve("k=2", lambda x: q.k_bit_quantize(x, 2)),
        ]),
        Figure("affine_k_bit_quantize", "affine_k_bit_quantize(x, k=2, w, b)", [
            Curve("w=2, b=-1", lambda x: q.affine_k_bit_quantize(x, 2, 2.0, -1.0)),
            Curve("w=0.5, b=0", lambda x: q.affine_k_bit_quantize(x, 2, 0.5, 0.0)),
        ], notes=["dL/dx = w * g"]),
        Figure("clamp_by_linear", "clamp_by_linear(x, eps=1e-5) on the whole grid", [
            Curve("eps=1e-5", q.clamp_by_linear),
        ], notes=["ends not shown: dL/dx is about -500 at x = -2 and at x = 2"]),
        Figure("dorefa_activations", "dorefa(x, k_bit, mode='activations')", [
            Curve("k_bit=1", lambda x: q.dorefa(x, 1)),
            Curve("k_bit=2 (default)", lambda x: q.dorefa(x, 2)),
            Curve("k_bit=4", lambda x: q.dorefa(x, 4)),
        ]),
        Figure("dorefa_weights", "dorefa(x, k_bit, mode='weights') on the whole grid", [
            Curve("k_bit=1", lambda x: q.dorefa(x, 1, "weights")),
            Curve("k_bit=2", lambda x: q.dorefa(x, 2, "weights")),
            Curve("k_bit=4", lambda x: q.dorefa(x, 4, "weights")),
        ], notes=["d = max|tanh x| = tanh 2; gradient sech^2(x) / d for every k_bit"]),
        # wage.md
        Figure("fixed_point_quantize", "fixed_point_quantize(x, wl=3, fl=1, rounding='nearest')", [
            Curve("symmetric=False", lambda x: q.fixed_point_quantize(x, 3, 1), has_grad=False),
            Curve("symmetric=True",
                  lambda x: q.fixed_point_quantize(x, 3, 1, symmetric=True), has_grad=False),
            Curve("clamp=False",
                  lambda x: q.fixed_point_quantize(x, 3, 1, clamp=False), has_grad=False),
        ]),
        Figure("wage_shift", "shift(x) on the whole grid", [Curve("shift", wage.shift)],
               notes=["max|x| = 2: divisor 2**ceil(log2 2) = 2"]),
        Figure("wage_C", "C(x, bits)", [
            Curve("bits=2", lambda x: wage.C(x, 2)),
            Curve("bits=8", lambda x: wage.C(x, 8)),
        ]),
        Figure("wage_QW", "QW(x, bits, scale=1)", [
            Curve("bits=2", lambda x: wage.QW(x, 2), has_grad=False),
            Curve("bits=3", lambda x: wage.QW(x, 3), has_grad=False),
        ]),
        Figure("wage_QG", "QG(x, bits_G=8, lr) on the whole grid", [
            Curve("lr=8", lambda x: wage.QG(x, 8, 8.0), has_grad=False),
            Curve("lr=1", lambda x: wage.QG(x, 8, 1.0), has_grad=False),
        ]),
        Figure("wage", "WAGEQuantizer(bits_A, bits_E)", [
            Curve("bits_A=2, bits_E=8", wage.WAGEQuantizer(2, 8)),
            Curve("bits_A=3, bits_E=8", wage.WAGEQuantizer(3, 8)),
            Curve("bits_A=8, bits_E=8 (default)", wage.WAGEQuantizer(8, 8)),
        ], notes=["ones upstream: shift(g) = 1, quantized to 127/128"]),
        Figure("wage_error", "WAGEError(bits_E=8)", [Curve("bits_E=8", wage.WAGEError(8))],
               notes=["ones upstream: 127/128 everywhere"]),
        Figure("wage_weight", "WAGEWeight(bits, scale=1)", [
            Curve("bits=2 (default)", wage.WAGEWeight(2)),
            Curve("bits=3", wage.WAGEWeight(3)),
        ]),
    ]


def draw(fig_spec: Figure, out_dir: Path, plt: object) -> Path:
    """Render one figure to ``out_dir/<name>.png`` and return the path."""
    x = grid()
    fig, (ax_y, ax_g) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=90)  # type: ignore[attr-defined]
    any_grad = False
    for i, curve in enumerate(fig_spec.curves):
        y, g = evaluate(curve, x)
        style = {"linewidth": 1.6 if i == 0 else 1.2, "linestyle": ("-", "--", ":", "-.")[i % 4]}
        ax_y.plot(x.numpy(), y.float().numpy(), label=curve.label, **style)
        if g is not None:
            any_grad = True
            values = g.float()
            if fig_spec.name == "clamp_by_linear":  # the two end spikes would flatten the rest
                values = values[1:-1]
                ax_g.plot(x[1:-1].numpy(), values.numpy(), label=curve.label, **style)
            else:
                ax_g.plot(x.numpy(), values.numpy(), label=curve.label, **style)
    ax_y.set_title("forward  y = q(x)", fontsize=9)
    ax_g.set_title("gradient  dL/dx  (upstream ones)", fontsize=9)
    for ax in (ax_y, ax_g):
        ax.axhline(0, color="0.8", linewidth=0.6, zorder=0)
        ax.axvline(0, color="0.8", linewidth=0.6, zorder=0)
        ax.set_xlim(-2.1, 2.1)
        ax.set_xlabel("x", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.25)
    if not any_grad:
        ax_g.text(0.5, 0.5, "no gradient (raw operation)", ha="center", va="center",
                  transform=ax_g.transAxes, fontsize=9)
        ax_g.set_yticks([])
    if len(fig_spec.curves) > 1:
        ax_y.legend(fontsize=7, loc="best")
    if fig_spec.notes:
        ax_g.set_xlabel("x\n" + "; ".join(fig_spec.notes), fontsize=8)
    fig.suptitle(fig_spec.title, fontsize=10)
    fig.tight_layout()
    path = out_dir / f"{fig_spec.name}.png"
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)  # type: ignore[attr-defined]
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--only", nargs="*", metavar="NAME", help="draw only these images")
    args = parser.parse_args(argv)
    try:
        import matplotlib
    except ModuleNotFoundError:
        print("docs/plots.py needs matplotlib, which is not installed. Install the optional "
              "'docs' extra:  pip install -e \".[docs]\"  (or: pip install matplotlib)",
              file=sys.stderr)
        return 1
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = figures()
    known = {spec.name for spec in specs}
    unknown = set(args.only or []) - known
    if unknown:
        parser.error(f"unknown image name(s) {sorted(unknown)}; known: {sorted(known)}")
    args.out.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        if args.only and spec.name not in args.only:
            continue
        print(draw(spec, args.out, plt))
    return 0


if __name__ == "__main__":
    sys.exit(main())
