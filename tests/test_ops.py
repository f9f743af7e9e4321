"""pack/unpack: exact round trips, storage sizes, refusals."""

from __future__ import annotations

import math

import pytest
import torch

from fxquant import ops

torch.manual_seed(0)


def _sizes(codes: torch.Tensor, numel: int, bits: int) -> None:
    per_byte = 8 // bits if bits <= 2 else 1
    assert codes.dtype == torch.uint8
    assert codes.numel() == math.ceil(numel / per_byte)


class TestOneBit:
    @pytest.mark.parametrize("shape", [(1,), (7, 3), (16, 3, 3, 3), (5, 2, 3)])
    def test_plus_minus_one_round_trip(self, shape):
        w = torch.where(torch.randn(shape) >= 0, 1.0, -1.0)
        codes, table = ops.pack(w, 1)
        _sizes(codes, w.numel(), 1)
        assert table.shape == (shape[0], 2)
        assert torch.equal(ops.unpack(codes, table, shape, 1), w)

    def test_per_channel_scaled_binary(self):
        alpha = torch.rand(8) + 0.1
        w = alpha.view(8, 1, 1) * torch.where(torch.randn(8, 4, 3) >= 0, 1.0, -1.0)
        codes, table = ops.pack(w, 1)
        out = ops.unpack(codes, table, w.shape, 1)
        assert torch.equal(out, w)

    def test_channel_with_a_single_value(self):
        w = torch.tensor([[1.0, 1.0, 1.0], [-1.0, 1.0, -1.0]])
        codes, table = ops.pack(w, 1)
        assert torch.equal(ops.unpack(codes, table, (2, 3), 1), w)

    def test_bit_layout_is_little_endian_within_a_byte(self):
        w = torch.tensor([[-1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0, 1.0]])
        codes, _ = ops.pack(w, 1)
        assert codes.tolist() == [0b10000110]

    def test_three_values_in_a_channel_cannot_pack(self):
        with pytest.raises(ops.CannotPack):
            ops.pack(torch.tensor([[-1.0, 0.0, 1.0]]), 1)


class TestMultiBit:
    def test_ternary_four_per_byte(self):
        w = torch.randint(-1, 2, (9, 4, 3, 3)).float()
        codes, table = ops.pack(w, 2)
        _sizes(codes, w.numel(), 2)
        assert table.numel() == 4
        assert torch.equal(ops.unpack(codes, table, w.shape, 2), w)

    @pytest.mark.parametrize("bits", [3, 4, 8])
    def test_k_bit_grid_with_offset(self, bits):
        n = 2**bits - 1
        w = 2 * (torch.randint(0, n + 1, (6, 5)).float() / n) - 1  # DoReFa weight grid
        codes, table = ops.pack(w, bits)
        _sizes(codes, w.numel(), bits)
        assert torch.equal(ops.unpack(codes, table, w.shape, bits), w)

    def test_too_many_values(self):
        with pytest.raises(ops.CannotPack, match="5 distinct"):
            ops.pack(torch.arange(5.0).view(5, 1), 2)

    @pytest.mark.parametrize("bad", [torch.tensor([[float("nan"), 1.0]]),
                                     torch.tensor([[1, -1]])])
    def test_nan_or_integer_weights_cannot_pack(self, bad):
        with pytest.raises(ops.CannotPack):
            ops.pack(bad, 2)

    @pytest.mark.parametrize("bits", [0, 9, 16])
    def test_bits_out_of_range(self, bits):
        with pytest.raises(ValueError, match="bits"):
            ops.pack(torch.ones(2, 2), bits)
