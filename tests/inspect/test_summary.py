"""summary(): per-layer and total numbers checked against hand-computed values."""

from __future__ import annotations

import torch
from torch import nn

import fxquant
from fxquant.inspect import layer_stats
from tests.models import MLP


def _totals(text: str) -> dict[str, str]:
    block = text.split("\n\n", 1)[1]
    rows = {}
    for line in block.splitlines():
        key, _, value = line.rpartition("  ")
        rows[key.strip()] = value.strip()
    return rows


class TestLarqSnapshot:
    """larq's snapshot: Conv 3x3, 3 -> 32 channels, ste_sign kernel, no input quantizer."""

    def prepared(self):
        model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1))
        return fxquant.prepare(model, fxquant.Recipe(weight="ste_sign"),
                               example_inputs=(torch.randn(1, 3, 32, 32),))

    def test_layer_numbers(self):
        (stats,) = layer_stats(self.prepared())
        assert (stats.weight_count, stats.bias_count) == (864, 32)
        assert stats.memory_bits == 864 * 1 + 32 * 32
        assert stats.macs == 864 * 32 * 32 and stats.mac_bits == 32
        assert stats.output_shape == (1, 32, 32, 32)

    def test_totals(self):
        totals = _totals(fxquant.summary(self.prepared()))
        assert totals["Total params"] == "896"
        assert totals["Model size"] == "236.00 B"  # 1888 bits
        assert totals["Float-32 equivalent"] == "3.50 KiB"  # 896 * 4 bytes
        expected = f"{1888 / (896 * 32):.4f} ({896 * 32 / 1888:.2f}x smaller)"
        assert totals["Memory vs float-32"] == expected
        assert totals["Number of MACs"] == "884,736"
        assert totals["Ratio of MACs that are binarized"] == "0.0000"


class TestBinaryMLP:
    def test_hand_computed_totals(self):
        prepared = fxquant.prepare(MLP((64, 32, 32, 10)), fxquant.Recipe.bnn(),
                                   example_inputs=(torch.randn(2, 64),))
        text = fxquant.summary(prepared)
        # fc1 float 64*32 + 32, fc2 binary 32*32 (+32 float bias), fc3 float 32*10 + 10
        params = 64 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10
        bits = (64 * 32 + 32) * 32 + 32 * 32 * 1 + 32 * 32 + (32 * 10 + 10) * 32
        totals = _totals(text)
        assert totals["Total params"] == f"{params:,}"
        assert totals["Model size"] == f"{bits / 8 / 1024:,.2f} KiB"
        macs_1bit, macs_32 = 32 * 32, 64 * 32 + 32 * 10
        assert totals["Number of MACs"] == f"{macs_1bit + macs_32:,}"
        share = macs_1bit / (macs_1bit + macs_32)
        assert totals["Ratio of MACs that are binarized"] == f"{share:.4f}"
        header = text.splitlines()[0]
        assert "1-bit MACs" in header and "32-bit MACs" in header
        assert "ste_sign (1)" in text

    def test_without_example_inputs_shapes_and_macs_are_unknown(self):
        prepared = fxquant.prepare(MLP(), fxquant.Recipe.bnn())
        assert all(s.macs is None and s.output_shape is None for s in layer_stats(prepared))
        assert _totals(fxquant.summary(prepared))["Number of MACs"] == "0"

    def test_shape_probe_leaves_batch_norm_statistics_alone(self):
        model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).train()
        prepared = fxquant.prepare(model, fxquant.Recipe(weight="ste_sign"),
                                   example_inputs=(torch.randn(8, 4),))
        assert prepared.training
        assert prepared.get_submodule("1").num_batches_tracked.item() == 0


def test_summary_returns_text_and_prints_nothing(capsys):
    text = fxquant.summary(fxquant.prepare(MLP(), fxquant.Recipe.bnn()))
    assert isinstance(text, str) and "fc2" in text
    assert capsys.readouterr().out == ""


class TestConvertedModel:
    def test_reports_the_bytes_really_stored(self):
        model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1))
        prepared = fxquant.prepare(model, fxquant.Recipe(weight="ste_sign"),
                                   example_inputs=(torch.randn(1, 3, 32, 32),))
        converted = fxquant.convert(prepared)
        # 864 sign bits packed 8 per byte, a (32, 2) float32 table of per-channel values, bias
        stored = 864 // 8 + 32 * 2 * 4 + 32 * 4
        assert sum(t.numel() * t.element_size() for t in converted.state_dict().values()) == stored
        (stats,) = layer_stats(converted)
        assert stats.weight_count == 864 and stats.weight_bits == 1
        assert stats.memory_bits == 8 * stored
        assert stats.macs == 864 * 32 * 32
        totals = _totals(fxquant.summary(converted))
        assert totals["Model size"] == f"{stored:.2f} B"
        assert totals["Total params"] == "896"

    def test_lowered_input_quantizers_still_count_as_binary_macs(self):
        prepared = fxquant.prepare(MLP(), fxquant.Recipe.bnn(),
                                   example_inputs=(torch.randn(2, 64),))
        converted = fxquant.convert(prepared)
        key = "Ratio of MACs that are binarized"
        assert _totals(fxquant.summary(converted))[key] == _totals(fxquant.summary(prepared))[key]
        (_, fc2, _) = layer_stats(converted)
        assert (fc2.input_quantizer, fc2.input_bits, fc2.weight_bits) == ("ste_sign", 1, 1)


def test_input_bits_seen_through_pooling_and_flatten():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3))
    recipe = fxquant.Recipe(weight="ste_sign", output="ste_sign").for_last(output=None)
    prepared = fxquant.prepare(model, recipe, example_inputs=(torch.randn(1, 1, 8, 8),))
    conv, fc = layer_stats(prepared)
    assert (conv.input_bits, fc.input_quantizer, fc.input_bits) == (32, "ste_sign", 1)
    assert fc.mac_bits == 1
