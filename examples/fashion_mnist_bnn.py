"""A binary CNN on Fashion-MNIST (60k/10k, offline from Debian's dataset-fashion-mnist).

conv32 (float, first layer) -> bconv32 -> pool -> bconv64 -> pool -> bFC256 -> FC10 (float, last
layer), batch norm after every layer, trained with fxquant's BNN recipe (or XNOR / Bi-Real / TWN).
Target: >= 91 % test accuracy in 4 epochs (a hand-written binary CNN reached 91.8 % here).

    apt-get install -y dataset-fashion-mnist
    python examples/fashion_mnist_bnn.py [--recipe bnn|xnor|bireal|twn] [--epochs 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from offline_data import load_fashion_mnist  # noqa: E402

import fxquant  # noqa: E402
from fxquant import training  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # progress bars are optional
    def tqdm(iterable, **_):  # type: ignore[no-redef]
        return iterable

RECIPES = {"bnn": fxquant.Recipe.bnn, "xnor": fxquant.Recipe.xnor, "bireal": fxquant.Recipe.bireal,
           "twn": fxquant.Recipe.twn}


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.Hardtanh(),
        nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.Hardtanh(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.Hardtanh(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 256, bias=False), nn.BatchNorm1d(256), nn.Hardtanh(),
        nn.Linear(256, 10),
    )


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.inference_mode():
        correct = sum((model(xb).argmax(1) == yb).sum().item()
                      for xb, yb in zip(x.split(1000), y.split(1000), strict=True))
    return correct / len(x)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="bnn")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--limit", type=int, default=None, help="use only N training images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    x_train, y_train = load_fashion_mnist(train=True)
    x_test, y_test = load_fashion_mnist(train=False)
    if args.limit:
        x_train, y_train = x_train[: args.limit], y_train[: args.limit]
    x_train, x_test = x_train * 2 - 1, x_test * 2 - 1  # inputs in [-1, 1]

    prepared = fxquant.prepare(make_model(), RECIPES[args.recipe](),
                               example_inputs=(x_test[:2],))
    opt = torch.optim.Adam(prepared.parameters(), lr=1e-2)
    steps = args.epochs * ((len(x_train) + args.batch - 1) // args.batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    training.LatentWeightClip(prepared, opt, bits=(1, 2))  # larq's weight_clip for latents
    start = time.perf_counter()
    for epoch in range(args.epochs):
        prepared.train()
        batches = torch.randperm(len(x_train)).split(args.batch)
        for idx in tqdm(batches, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False):
            opt.zero_grad()
            F.cross_entropy(prepared(x_train[idx]), y_train[idx]).backward()
            opt.step()
            sched.step()
    train_s = time.perf_counter() - start
    acc = evaluate(prepared, x_test, y_test)

    converted = fxquant.convert(prepared)
    converted_acc = evaluate(converted, x_test, y_test)
    with tempfile.TemporaryDirectory() as tmp:
        fxquant.save(converted, os.path.join(tmp, "m.fxq"))
        torch.save(make_model().state_dict(), os.path.join(tmp, "float.pt"))
        size = os.path.getsize(os.path.join(tmp, "m.fxq"))
        float_size = os.path.getsize(os.path.join(tmp, "float.pt"))
    print(fxquant.summary(converted))
    print(tabulate([[args.recipe, args.epochs, f"{train_s:.0f} s", f"{100 * acc:.2f} %",
                     f"{100 * converted_acc:.2f} %", f"{size:,} B", f"{float_size:,} B",
                     f"{float_size / size:.1f}x"]],
                   headers=["recipe", "epochs", "train time", "test acc (prepared)",
                            "test acc (converted)", "file", "float file", "compression"]))
    print(f"test accuracy: {100 * acc:.1f}%")
    return acc


if __name__ == "__main__":
    main()
