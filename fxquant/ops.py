"""Weight packing: low-bit weights stored as packed codes plus a small table of their exact values.

``pack(w, bits)`` turns a quantized weight into ``(codes, table)``; ``unpack(codes, table, shape,
bits)`` gives back ``w`` exactly (the table holds the very float values, so nothing can round):

* 1 bit: one bit per weight, 8 per byte, and a ``(out_channels, 2)`` table, so per-channel scaled
  binary weights (XNOR / Bi-Real ``α·sign(W)``) pack as well as plain ±1;
* 2 bits: four codes per byte and a 4-entry per-tensor table (ternary {-1, 0, 1});
* 3 to 8 bits: one ``uint8`` code per weight and a ``2**bits``-entry per-tensor table (DoReFa,
  WAGE). A table is the general form of "integer codes with a scale": it also covers grids with
  an offset such as DoReFa's ``2·i/n − 1``.

``unpack`` uses only plain tensor ops, so converted graphs export with ``torch.export``. In a
converted graph a :class:`PackedWeight` module holds the codes and table and unpacks them once.

>>> w = torch.tensor([[1., -1., 1.], [-.5, .5, .5]])
>>> codes, table = pack(w, 1)
>>> codes.dtype, codes.numel(), torch.equal(unpack(codes, table, (2, 3), 1), w)
(torch.uint8, 1, True)
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["pack", "unpack", "packable_bits", "CannotPack", "PackedWeight"]

packable_bits = range(1, 9)


class CannotPack(ValueError):
    """The tensor has more distinct values than its bit width can index."""


_BIT_MASKS = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)  # bit i of a byte
_PLACES = torch.tensor([1, 2])  # the values of a 2-bit code's two bits


def _codes_per_byte(bits: int) -> int:
    return 8 // bits if bits <= 2 else 1


def pack(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack a quantized weight (first dim = output channels) into (codes uint8, value table)."""
    if bits not in packable_bits:
        raise ValueError(f"pack: bits must be in 1..8, got {bits}")
    if not w.is_floating_point() or bool(torch.isnan(w).any()):
        raise CannotPack("pack: weights must be floating point and free of NaN")
    if bits == 1:
        flat = w.reshape(w.shape[0], -1)
        lo, hi = flat.min(dim=1).values, flat.max(dim=1).values
        if not bool(((flat == lo[:, None]) | (flat == hi[:, None])).all()):
            raise CannotPack("pack: a 1-bit weight needs at most two values per output channel")
        table = torch.stack([lo, hi], dim=1)
        codes = (flat == hi[:, None]) & (hi != lo)[:, None]
    else:
        table = torch.unique(w)
        if table.numel() > 2**bits:
            raise CannotPack(f"pack: {table.numel()} distinct values do not fit {bits} bits")
        codes = torch.searchsorted(table, w.reshape(-1).contiguous())
        table = torch.cat([table, table[-1:].expand(2**bits - table.numel())])
    codes = codes.reshape(-1).to(torch.uint8)
    per_byte = _codes_per_byte(bits)
    if per_byte > 1:
        pad = (-codes.numel()) % per_byte
        codes = torch.cat([codes, codes.new_zeros(pad)]).view(-1, per_byte)
        shifts = torch.arange(per_byte, dtype=torch.uint8, device=codes.device) * bits
        codes = (codes << shifts).sum(dim=1, dtype=torch.uint8)
    return codes, table


def unpack(codes: torch.Tensor, table: torch.Tensor, shape: tuple[int, ...], bits: int
           ) -> torch.Tensor:
    """Inverse of :func:`pack`: the exact weight of ``shape``."""
    numel = math.prod(shape)
    per_byte = _codes_per_byte(bits)
    if per_byte > 1:  # bit tests, not shifts: ONNX exporters translate `&` on uint8, not `>>`
        set_bits = (codes.unsqueeze(1) & _BIT_MASKS.to(codes.device)) != 0  # (bytes, 8)
        if bits == 2:  # two bits a code, LSB first
            set_bits = (set_bits.view(-1, per_byte, 2) * _PLACES.to(codes.device)).sum(-1)
        codes = set_bits.reshape(-1)[:numel]
    if bits == 1:
        flat = codes.view(shape[0], -1).bool()
        return torch.where(flat, table[:, 1:2], table[:, 0:1]).view(shape)
    return table[codes.long()].view(shape)


class PackedWeight(nn.Module):
    """A packed low-bit weight in a converted graph: ``forward()`` returns the exact weight.

    ``codes`` and ``table`` are the persistent buffers (what the state_dict and files hold). The
    unpacked float tensor is a non-persistent buffer computed when the module is built, loaded
    (``load_state_dict``) or unpickled, so eager inference does not unpack on every call and
    ``forward`` mutates nothing (``torch.export`` sees a constant). It follows ``.to()`` and is
    never saved. After changing ``codes`` in place, call :meth:`refresh`.
    """

    unpacked: torch.Tensor

    def __init__(self, codes: torch.Tensor, table: torch.Tensor, shape: tuple[int, ...],
                 bits: int) -> None:
        super().__init__()
        self.register_buffer("codes", codes)
        self.register_buffer("table", table)
        self.shape = tuple(int(d) for d in shape)
        self.bits = int(bits)
        self.register_buffer("unpacked", self._unpack(), persistent=False)
        self.register_load_state_dict_post_hook(PackedWeight._refresh_after_load)

    def _unpack(self) -> torch.Tensor:
        with torch.inference_mode(False), torch.no_grad():
            return unpack(self.codes, self.table, self.shape, self.bits)

    def refresh(self) -> None:
        """Recompute the unpacked weight from ``codes`` and ``table``."""
        self.unpacked = self._unpack()

    @staticmethod
    def _refresh_after_load(module: nn.Module, incompatible_keys: object) -> None:
        module.refresh()

    def forward(self) -> torch.Tensor:
        if torch.compiler.is_exporting() or torch.jit.is_tracing():
            # torch.export / ONNX: record the unpack, so the program stores the packed codes
            return unpack(self.codes, self.table, self.shape, self.bits)
        return self.unpacked

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        state["_buffers"] = {k: v for k, v in state["_buffers"].items() if k != "unpacked"}
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        super().__setstate__(state)
        self._buffers["unpacked"] = self._unpack()

    def extra_repr(self) -> str:
        return f"shape={self.shape}, bits={self.bits}"
