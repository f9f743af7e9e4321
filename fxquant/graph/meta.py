"""The one typed record fxquant passes share, stored at ``node.meta["fxquant"]``.

Passes never keep side tables keyed by node name: every fact a later pass, ``summary()`` or
``to_networkx()`` needs travels on the node itself as a frozen :class:`QuantRecord`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Union

import torch.fx

from fxquant.quantizers.base import Quantizer

__all__ = ["META_KEY", "Role", "Slot", "SLOTS", "QuantSpec", "QuantRecord", "get_record",
           "set_record", "update_record", "BLOCK_KEY", "BlockCall"]

META_KEY = "fxquant"
BLOCK_KEY = "fxquant_block"  # traced nodes, while prepare(..., blocks=...) runs: a BlockCall

Role = Literal["layer", "weight_quantizer", "input_quantizer", "output_quantizer",
               "error_quantizer", "folded_weight", "packed_weight", "block"]
Slot = Literal["weight", "input", "output", "error"]
SLOTS: tuple[Slot, ...] = ("weight", "input", "output", "error")

QuantizerLike = Union[str, Quantizer, Callable[[], Quantizer]]


@dataclass(frozen=True)
class QuantSpec:
    """What one recipe slot resolved to for one layer, and which rule decided it."""

    quantizer: QuantizerLike
    rule: str


@dataclass(frozen=True)
class QuantRecord:
    """Facts about one node.

    ``role``: "layer" for a weighted layer, ``<slot>_quantizer`` for an inserted quantizer,
    "folded_weight" / "packed_weight" for a weight constant after convert's folding / packing,
    "block" for the call of a block prepared as its own GraphModule (``layer``: its path,
    ``op``: the class it was; see :mod:`fxquant.graph.blocks`).
    ``layer``: the qualified path of the layer (its module path, or for a functional call the
    path of its weight without ``.weight``). ``op``: the layer kind ("linear", "conv2d", ...).
    ``module``: the module that owns the layer's parameters ("" when it has none).
    ``specs``: resolved recipe slots (layers only; slots left in float are absent).
    ``quantizers``: slot -> inserted submodule name (layers, filled by the insert passes).
    ``quantizer`` / ``bits``: registry name and bits (quantizer and weight-constant nodes).
    ``tensors`` / ``numel``: for weight constants, the state_dict keys that store the weight and
    its number of values (so ``summary`` can report the bytes really stored).
    ``absorbed``: for a float layer that convert's ``fold_batch_norm`` folded a batch norm into,
    the parameters of the prepared model the fold removed (the batch norm's weight and bias,
    less the bias the layer gained), so ``summary`` counts what the prepared model had.
    """

    role: Role
    layer: str
    op: str = ""
    module: str = ""
    specs: tuple[tuple[Slot, QuantSpec], ...] = ()
    quantizers: tuple[tuple[Slot, str], ...] = ()
    quantizer: str = ""
    bits: int = 32
    tensors: tuple[str, ...] = ()
    numel: int = 0
    absorbed: int = 0

    def spec(self, slot: Slot) -> QuantSpec | None:
        return dict(self.specs).get(slot)

    def quantizer_name(self, slot: Slot) -> str | None:
        return dict(self.quantizers).get(slot)


@dataclass(frozen=True)
class BlockCall:
    """Where the tracer was when it created a node: in the ``call``-th call (from 0) of the block
    at ``path`` ("" outside every block); ``node`` is the node's name then, so a copy that a pass
    makes later (a new name, the same meta) is not mistaken for the traced node."""

    path: str
    call: int
    node: str


def get_record(node: torch.fx.Node) -> QuantRecord | None:
    """The record on ``node``, or None."""
    return node.meta.get(META_KEY)


def set_record(node: torch.fx.Node, record: QuantRecord) -> None:
    node.meta[META_KEY] = record


def update_record(node: torch.fx.Node, **changes: object) -> QuantRecord:
    """Replace fields of the record on ``node`` (which must have one) and return the new record."""
    record = dataclasses.replace(node.meta[META_KEY], **changes)
    node.meta[META_KEY] = record
    return record
