"""Import torchvision's model definitions where its C extension cannot load.

The PyPI torchvision wheel's ``_C`` extension needs CUDA libraries that the CPU-only torch build
lacks, so ``import torchvision`` fails while registering fake (meta) kernels for its custom ops
(``torchvision::nms`` ...): those ops were never defined. The model definitions are pure Python,
so :func:`import_torchvision` imports torchvision with ``torch.library.register_fake`` told to skip
``torchvision::`` ops during the import only. Detection ops (``torchvision.ops.nms``,
``roi_align``) then fail when called; classification models never call them.

Install it as ``pip install --no-deps "torchvision==0.28.0"`` (the release matching torch 2.13)
plus ``pillow``; see ``.ci/run``.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch.library

__all__ = ["import_torchvision"]


@contextlib.contextmanager
def _skip_torchvision_fakes() -> Iterator[None]:
    original = torch.library.register_fake

    def register_fake(op: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(op, str) and op.startswith("torchvision::"):
            return (lambda fn: fn) if not args else args[0]   # used as a decorator or directly
        return original(op, *args, **kwargs)

    torch.library.register_fake = register_fake
    try:
        yield
    finally:
        torch.library.register_fake = original


def import_torchvision() -> ModuleType:
    """``import torchvision`` that tolerates its missing C ops (see the module docstring).

    Raises ImportError when torchvision is not installed at all.
    """
    with _skip_torchvision_fakes():
        return importlib.import_module("torchvision")
