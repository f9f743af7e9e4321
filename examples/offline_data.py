"""Offline loaders for the real datasets that ship with packages (no download, no numpy needed)."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import os

import torch

__all__ = ["load_digits", "load_fashion_mnist", "split"]


def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed (pip install {name})")
    return list(spec.submodule_search_locations)[0]


def _read_csv_gz(path: str) -> torch.Tensor:
    with gzip.open(path, "rt") as f:
        return torch.tensor([[float(v) for v in row] for row in csv.reader(f)])


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits: images (1797, 1, 8, 8) in [0, 1] and labels (1797,)."""
    path = os.path.join(_package_dir("sklearn"), "datasets", "data", "digits.csv.gz")
    a = _read_csv_gz(path)
    return (a[:, :-1] / 16.0).view(-1, 1, 8, 8), a[:, -1].long()


def _read_idx(path: str) -> torch.Tensor:
    """An IDX file (MNIST format): 2 zero bytes, dtype byte, ndim, big-endian u32 dims, data."""
    with gzip.open(path, "rb") as f:
        raw = bytearray(f.read())
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(raw, dtype=torch.uint8, offset=4 + 4 * ndim).view(*dims)


def load_fashion_mnist(train: bool = True, root: str = "/usr/share/datasets/fashion-mnist"
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST from Debian's ``dataset-fashion-mnist``: images (N, 1, 28, 28) in [0, 1] and
    labels (N,); N = 60000 (train) or 10000 (test).

    Install with ``apt-get install dataset-fashion-mnist``.
    """
    prefix = "train" if train else "t10k"
    images = os.path.join(root, f"{prefix}-images-idx3-ubyte.gz")
    if not os.path.exists(images):
        raise FileNotFoundError(f"{images} not found (apt-get install dataset-fashion-mnist)")
    x = _read_idx(images).float().div_(255).unsqueeze(1)
    return x, _read_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz")).long()


def split(x: torch.Tensor, y: torch.Tensor, test_fraction: float = 0.2, seed: int = 0
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A seeded shuffle split into (x_train, y_train, x_test, y_test)."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]
