"""WAGE 2-8-8-8 in graph mode: a small VGG-style net trained the way QPyTorch's WAGE example does.

Wu et al., "Training and Inference with Integers in Deep Neural Networks" (ICLR 2018), as in
QPyTorch ``examples/WAGE`` (``reproduce.sh``): 2-bit weights (nearest), 8-bit activations
(nearest), 8-bit errors (stochastic), 8-bit gradients (stochastic); inputs ``2x - 1``; SSE loss
``0.5 * sum((logits - onehot)**2)``; no optimizer but the WAGE update ``acc <- C(acc) - QG(grad)``
with lr 8, then 1, then 1/8 (QPyTorch: epochs 0-199, 200-249, 250-299 of 300; here the same
fractions of ``--epochs``); conv-relu stacks without bias or batch norm (VGG7LP, smaller).

    python examples/wage.py                   # sklearn digits, 30 epochs: 98.6 % in ~20 s
    python examples/wage.py --data fashion    # Fashion-MNIST (apt-get install
                                              # dataset-fashion-mnist): 1 epoch 86.2 %, ~2.6 min

Everything random (init, batch order, stochastic rounding) is seeded by ``--seed``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from offline_data import load_digits, load_fashion_mnist, split  # noqa: E402

import fxquant  # noqa: E402
from fxquant.wage import WAGEOptimizer, initialize, seed_rounding  # noqa: E402


class SmallVGG(nn.Module):
    """VGG7LP's shape, small: [conv-relu x2, pool] x2, then fc-relu, fc. No bias, no BN.

    QPyTorch pools before the ReLU of each group's second conv; pooling after the ReLU (and after
    its quantizer) gives the same forward values (max pool, ReLU and QA are monotone) and keeps
    fxquant's ``layer -> activation`` pattern, so QA/QE land right after each ReLU.
    """

    def __init__(self, image_size: int, widths: tuple[int, int] = (32, 64), hidden: int = 256,
                 classes: int = 10) -> None:
        super().__init__()
        a, b = widths
        self.conv1 = nn.Conv2d(1, a, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(a, a, 3, padding=1, bias=False)
        self.conv3 = nn.Conv2d(a, b, 3, padding=1, bias=False)
        self.conv4 = nn.Conv2d(b, b, 3, padding=1, bias=False)
        self.fc1 = nn.Linear(b * (image_size // 4) ** 2, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.conv3(x))
        x = F.max_pool2d(F.relu(self.conv4(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def sse(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """QPyTorch ``utils.SSE``: ``0.5 * sum((logits - onehot)**2)`` (a sum, not a mean)."""
    return 0.5 * (logits - F.one_hot(labels, logits.shape[1]).to(logits.dtype)).square().sum()


def load(data: str, seed: int) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test) with inputs in [-1, 1] (QPyTorch: ``2x - 1``)."""
    if data == "digits":
        x, y = load_digits()
        x_train, y_train, x_test, y_test = split(x, y, seed=seed)
    else:
        (x_train, y_train), (x_test, y_test) = load_fashion_mnist(True), load_fashion_mnist(False)
    return x_train * 2 - 1, y_train, x_test * 2 - 1, y_test


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = sum((model(xb).argmax(1) == yb).sum().item()
                  for xb, yb in zip(x.split(batch), y.split(batch), strict=True))
    return correct / len(x)


def stored_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=("digits", "fashion"), default="digits")
    parser.add_argument("--epochs", type=int, default=None,
                        help="default: 30 for digits, 6 for fashion")
    parser.add_argument("--batch-size", type=int, default=128)  # QPyTorch's
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: 1 for digits, whose tensors are "
                             "too small to share, torch's default for fashion)")
    args = parser.parse_args(argv)
    epochs = args.epochs or (30 if args.data == "digits" else 6)
    threads = args.threads or (1 if args.data == "digits" else None)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(args.seed)

    x_train, y_train, x_test, y_test = load(args.data, args.seed)
    image_size = x_train.shape[-1]
    model = SmallVGG(image_size, widths=(32, 64), hidden=128 if args.data == "digits" else 256)
    recipe = fxquant.Recipe.wage(bits_W=2, bits_A=8, bits_G=8, bits_E=8, E_mode="stochastic")
    prepared = fxquant.prepare(model, recipe, example_inputs=(x_train[:2],))
    scales = initialize(prepared, factor=1.0, generator=torch.Generator().manual_seed(args.seed))
    seed_rounding(prepared, args.seed)  # stochastic E rounding, one generator per quantizer
    opt = WAGEOptimizer(prepared, lr=8.0, bits_G=8, grad_mode="stochastic",
                        generator=torch.Generator().manual_seed(args.seed))
    # QPyTorch: lr 8 for 2/3 of the epochs, 1 for the next 1/6, 1/8 for the last 1/6
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda e: 1.0 if e < 2 * epochs / 3 else (1 / 8 if e < 5 * epochs / 6 else 1 / 64))
    print(f"WAGE 2-8-8-8 on {args.data}: {len(x_train)} train / {len(x_test)} test images, "
          f"layer scales {scales}")

    order = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for epoch in range(epochs):
        prepared.train()
        lr = opt.param_groups[0]["lr"]
        batches = torch.randperm(len(x_train), generator=order).split(args.batch_size)
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{epochs} lr {lr:g}", leave=False,
                   file=sys.stdout, disable=None)  # None: no bar when not a terminal
        for idx in bar:
            opt.zero_grad()
            logits = prepared(x_train[idx])
            loss = sse(logits, y_train[idx])
            loss.backward()
            opt.step()
            loss_sum += loss.item()
            correct += (logits.argmax(1) == y_train[idx]).sum().item()
            seen += len(idx)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        sched.step()
        test_acc = accuracy(prepared, x_test, y_test)
        tqdm.write(f"epoch {epoch + 1:3d}  lr {lr:<6g} train loss {loss_sum / seen:.4f}  "
                   f"train acc {100 * correct / seen:5.1f}%  test acc {100 * test_acc:5.1f}%  "
                   f"({time.perf_counter() - start:.1f} s)", file=sys.stdout)
    train_time = time.perf_counter() - start

    converted = fxquant.convert(prepared)
    test_acc = accuracy(prepared, x_test, y_test)
    converted_acc = accuracy(converted, x_test, y_test)
    float_bytes = 4 * sum(p.numel() for p in prepared.parameters())
    print()
    print(fxquant.summary(converted))
    print()
    print(tabulate([
        ["data", f"{args.data} ({len(x_train)} / {len(x_test)})"],
        ["epochs", epochs],
        ["training time", f"{train_time:.1f} s ({torch.get_num_threads()} threads)"],
        ["test accuracy (prepared, eval)", f"{100 * test_acc:.2f}%"],
        ["test accuracy (converted)", f"{100 * converted_acc:.2f}%"],
        ["model size (converted, stored)", f"{stored_bytes(converted):,} B"],
        ["float-32 model", f"{float_bytes:,} B"],
        ["compression", f"{float_bytes / stored_bytes(converted):.1f}x"],
    ], tablefmt="simple", disable_numparse=True))
    print(f"test accuracy: {100 * test_acc:.1f}%")
    return test_acc


if __name__ == "__main__":
    main()
