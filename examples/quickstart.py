"""fxquant quick start: a binary MLP on scikit-learn's digits (real data, offline).

prepare (BNN recipe: binary weights and activations, first and last layer in float) -> train with an
ordinary PyTorch loop -> convert (binary weights folded and packed 8 per byte, batch norm folded) ->
summary -> save. Runs in seconds on 2 CPU cores.

    python examples/quickstart.py [--epochs 10] [--out quickstart_bnn.fxq]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from offline_data import load_digits, split  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # progress bars are optional
    def tqdm(iterable, **_):  # type: ignore[no-redef]
        return iterable

from tabulate import tabulate  # noqa: E402

import fxquant  # noqa: E402


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 256), nn.BatchNorm1d(256), nn.Hardtanh(),
        nn.Linear(256, 256), nn.BatchNorm1d(256), nn.Hardtanh(),
        nn.Linear(256, 10),
    )


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "quickstart_bnn.fxq"),
                        help="where to save the converted model")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    x, y = load_digits()
    x = x * 2 - 1  # inputs in [-1, 1]
    x_train, y_train, x_test, y_test = split(x, y)

    prepared = fxquant.prepare(make_model(), fxquant.Recipe.bnn(), example_inputs=(x[:2],))
    opt = torch.optim.Adam(prepared.parameters(), lr=1e-2)
    fxquant.training.LatentWeightClip(prepared, opt)  # keep binary latents in [-1, 1] (larq)
    steps = args.epochs * ((len(x_train) + 99) // 100)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in tqdm(range(args.epochs), desc="training", unit="epoch"):
        prepared.train()
        for idx in torch.randperm(len(x_train)).split(100):
            opt.zero_grad()
            F.cross_entropy(prepared(x_train[idx]), y_train[idx]).backward()
            opt.step()
            sched.step()

    acc = accuracy(prepared, x_test, y_test)
    converted = fxquant.convert(prepared)
    print(fxquant.summary(converted))
    assert torch.allclose(converted(x_test), prepared(x_test), rtol=1e-5, atol=1e-5)
    fxquant.save(converted, args.out)
    reloaded = fxquant.load(args.out, make_model())
    converted_acc = accuracy(reloaded, x_test, y_test)
    size, float_size = os.path.getsize(args.out), 4 * sum(
        p.numel() for p in make_model().parameters())
    print(tabulate([["prepared (QAT)", f"{100 * acc:.2f} %", "-", "-"],
                    [f"converted, reloaded from {os.path.basename(args.out)}",
                     f"{100 * converted_acc:.2f} %", f"{size:,} B",
                     f"{float_size / size:.1f}x vs {float_size:,} B float32"]],
                   headers=["model", "test accuracy", "file", "compression"]))
    print(f"test accuracy: {100 * acc:.1f}%")
    return acc


if __name__ == "__main__":
    main()
