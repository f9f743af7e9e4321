"""Where the user's code starts: warnings and errors point there, not into torch or fxquant."""

from __future__ import annotations

import os
import sys

import torch

__all__ = ["is_internal", "user_stacklevel"]

_INTERNAL = (os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
             os.path.dirname(os.path.abspath(__file__)) + os.sep,  # fxquant/
             "<eval_with_key>")  # the generated code of a GraphModule's forward


def is_internal(filename: str) -> bool:
    """Whether ``filename`` belongs to torch, fxquant or a GraphModule's generated code."""
    return (filename if filename.startswith("<") else os.path.abspath(filename)).startswith(
        _INTERNAL)


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a ``warnings.warn`` in the caller of this function point at
    the innermost frame outside torch and fxquant (the user's line)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and is_internal(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    return level
