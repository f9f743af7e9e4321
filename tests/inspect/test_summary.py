"""summary(): the text larq users expect, checked against hand-computed numbers."""

from __future__ import annotations

import textwrap
import warnings

import pytest
import torch
from torch import nn

import fxquant
from fxquant.inspect import layer_stats, record_shapes
from tests.graph.test_modes import AuxHead
from tests.models import MLP


def _totals(text: str) -> dict[str, str]:
    block = text.split("\n\n", 1)[1]
    rows = {}
    for line in block.splitlines():
        key, _, value = line.partition("  ")
        rows[key.strip()] = value.strip()
    return rows


def _table(text: str) -> list[list[str]]:
    """Rows of the layer table (header, rules and Total row excluded), split on 2+ spaces."""
    lines = text.split("\n\n", 1)[0].splitlines()
    return [[c.strip() for c in line.split("  ") if c.strip()] for line in lines[2:-2]]


def _column(text: str, name: str) -> list[str]:
    """One right-aligned column of the layer table, Total row excluded."""
    lines = text.split("\n\n", 1)[0].splitlines()
    end = lines[0].index(name) + len(name)
    return [line[:end].split()[-1] for line in lines[2:-2]]


def _prepare(model: nn.Module, recipe: fxquant.Recipe, **kwargs) -> torch.fx.GraphModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-negative-input advice is not under test here
        return fxquant.prepare(model, recipe, **kwargs)


def _bnn_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
                         nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


# Hand-computed, input (1, 1, 8, 8), Recipe.bnn() (first and last layer float):
#   0 conv 1->4 3x3 float: 36 weights, 36*32 bits = 144 B = 0.14 KiB, MACs 36*8*8 = 2,304 (32-bit)
#   1 BatchNorm2d(4): gamma, beta = 8 params, 32 B = 0.03 KiB
#   2 conv 4->8 3x3 ste_sign weights and inputs: 288 weights at 1 bit = 36 B = 0.04 KiB,
#     MACs 288*8*8 = 18,432 at max(1, 1) = 1 bit
#   3 BatchNorm2d(8): 16 params, 64 B = 0.06 KiB
#   4 MaxPool2d: (8, 4, 4); 5 Flatten: 128; no params
#   6 linear 128->10 float: 1,290 params, 5,160 B = 5.04 KiB, MACs 1,280 (32-bit)
# Total 1,638 params; 5,436 B = 5.31 KiB; float-32: 1,638*4 = 6,552 B = 6.40 KiB;
# ratio 5,436/6,552 = 0.8297 (1.21x); MACs 22,016, of which 1-bit 18,432/22,016 = 0.8372.
PREPARED = """\
Layer    Op           Weight q. (bits)    Input q. (bits)    Output shape      Params    Memory (KiB)    1-bit MACs    32-bit MACs
-------  -----------  ------------------  -----------------  --------------  --------  --------------  ------------  -------------
0        conv2d       - (32)              - (32)             (-1, 4, 8, 8)         36            0.14             0          2,304
1        BatchNorm2d  -                   -                  (-1, 4, 8, 8)          8            0.03             0              0
2        conv2d       ste_sign (1)        ste_sign (1)       (-1, 8, 8, 8)        288            0.04        18,432              0
3        BatchNorm2d  -                   -                  (-1, 8, 8, 8)         16            0.06             0              0
4        MaxPool2d    -                   -                  (-1, 8, 4, 4)          0            0.00             0              0
5        Flatten      -                   -                  (-1, 128)              0            0.00             0              0
6        linear       - (32)              - (32)             (-1, 10)           1,290            5.04             0          1,280
-------  -----------  ------------------  -----------------  --------------  --------  --------------  ------------  -------------
Total                                                                           1,638            5.31        18,432          3,584

Total params                      1,638
Trainable params                  1,638
Non-trainable params              0
Model size                        5.31 KiB
Float-32 equivalent               6.40 KiB
Compression ratio of memory       0.8297 (1.21x smaller)
Number of MACs                    22,016
Ratio of MACs that are binarized  0.8372"""  # noqa: E501

# convert: batch norm 1 folds into the float conv 0 (W' = W*s, a new bias of 4: 40 values,
# 160 B); the row counts the prepared model's 36 + 8 = 44 params (trainable, as the conv's
# weight); conv 2 (sign input, sign weights) becomes the packed binary op: its 288 signs are
# stored in the op's layout, 4 input channels padded to one byte per (out, kh, kw) row:
# 8*3*3 rows * 1 B = 72 B, plus a float32 scale per output channel (32 B) = 104 B = 0.10 KiB,
# constants, so non-trainable; batch norm 3 stays (F.batch_norm on its own tensors: gamma, beta,
# mean, var 4*8*4 B + the int64 num_batches_tracked = 136 B = 0.13 KiB).
# Total 1,638 params as prepared, 160 + 104 + 136 + 5,160 = 5,560 B = 5.43 KiB; float-32 as
# prepared 6,552 B = 6.40 KiB; ratio 5,560/6,552 = 0.8486 (1.18x).
CONVERTED = """\
Layer    Op          Weight q. (bits)    Input q. (bits)    Output shape      Params    Memory (KiB)    1-bit MACs    32-bit MACs
-------  ----------  ------------------  -----------------  --------------  --------  --------------  ------------  -------------
0        conv2d      - (32)              - (32)             (-1, 4, 8, 8)         44            0.16             0          2,304
2        conv2d      ste_sign (1)        ste_sign (1)       (-1, 8, 8, 8)        288            0.10        18,432              0
3        batch_norm  -                   -                  (-1, 8, 8, 8)         16            0.13             0              0
4        MaxPool2d   -                   -                  (-1, 8, 4, 4)          0            0.00             0              0
5        Flatten     -                   -                  (-1, 128)              0            0.00             0              0
6        linear      - (32)              - (32)             (-1, 10)           1,290            5.04             0          1,280
-------  ----------  ------------------  -----------------  --------------  --------  --------------  ------------  -------------
Total                                                                          1,638            5.43        18,432          3,584

Total params                      1,638
Trainable params                  1,350
Non-trainable params              288
Model size                        5.43 KiB
Float-32 equivalent               6.40 KiB
Compression ratio of memory       0.8486 (1.18x smaller)
Number of MACs                    22,016
Ratio of MACs that are binarized  0.8372"""  # noqa: E501


class TestSnapshot:
    def prepared(self) -> torch.fx.GraphModule:
        return _prepare(_bnn_cnn(), fxquant.Recipe.bnn(),
                        example_inputs=(torch.randn(1, 1, 8, 8),))

    def test_prepared_model_text(self):
        assert fxquant.summary(self.prepared()) == PREPARED

    def test_converted_model_text(self):
        assert fxquant.summary(fxquant.convert(self.prepared())) == CONVERTED

    def test_example_inputs_given_to_summary_give_the_same_text(self):
        prepared = _prepare(_bnn_cnn(), fxquant.Recipe.bnn())
        assert fxquant.summary(prepared, example_inputs=(torch.randn(3, 1, 8, 8),)) == PREPARED

    def test_docstring_example_is_this_snapshot(self):
        # summary's docstring shows the same model's table: it must not drift from the oracle
        assert textwrap.indent(PREPARED, " " * 8) in fxquant.summary.__doc__


class TestLarqConv:
    """larq's own snapshot layer: Conv 3x3, 3 -> 32 channels, ste_sign kernel, no input
    quantizer."""

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
        text = fxquant.summary(self.prepared())
        totals = _totals(text)
        assert totals["Total params"] == "896"
        assert totals["Model size"] == "0.23 KiB"  # 1888 bits = 236 B
        assert totals["Float-32 equivalent"] == "3.50 KiB"  # 896 * 4 bytes
        expected = f"{1888 / (896 * 32):.4f} ({896 * 32 / 1888:.2f}x smaller)"
        assert totals["Compression ratio of memory"] == expected
        assert totals["Number of MACs"] == "884,736"
        assert totals["Ratio of MACs that are binarized"] == "0.0000"
        assert "Ratio of MACs that are ternarized" not in totals
        assert _table(text)[0][4] == "(-1, 32, 32, 32)"


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

    def test_without_example_inputs_macs_are_unknown_never_zero(self):
        prepared = fxquant.prepare(MLP(), fxquant.Recipe.bnn())
        assert all(s.macs is None and s.output_shape is None for s in layer_stats(prepared))
        text = fxquant.summary(prepared)
        assert _totals(text)["Number of MACs"] == ("unknown: pass example_inputs to "
                                                   "fxquant.prepare or fxquant.summary")
        assert "Ratio of MACs that are binarized" not in _totals(text)
        fc_rows = [r for r in _table(text) if r[1] == "linear"]
        assert len(fc_rows) == 3 and all(r[-2:] == ["?", "?"] for r in fc_rows)
        assert text.split("\n\n")[0].splitlines()[-1].split()[-2:] == ["?", "?"]


class TestRowsAddUp:
    @pytest.mark.parametrize("make", [_bnn_cnn, MLP, AuxHead], ids=["cnn", "mlp", "aux"])
    @pytest.mark.parametrize("training", [True, False])
    def test_rows_sum_to_the_totals_and_to_the_models_parameters(self, make, training):
        model = make()
        x = {_bnn_cnn: torch.randn(2, 1, 8, 8), MLP: torch.randn(2, 64)}.get(make,
                                                                           torch.randn(2, 6))
        prepared = _prepare(model, fxquant.Recipe.bnn(), example_inputs=(x,)).train(training)
        text = fxquant.summary(prepared)
        counts = [int(c.replace(",", "")) for c in _column(text, "Params")]
        totals = _totals(text)
        expected = sum(p.numel() for p in model.parameters())  # torch's count, the oracle
        assert sum(counts) == expected
        assert totals["Total params"] == f"{expected:,}"
        assert totals["Trainable params"] == f"{expected:,}"
        assert totals["Non-trainable params"] == "0"

    def test_rows_for_modules_that_hold_parameters_or_change_shape(self):
        prepared = _prepare(_bnn_cnn(), fxquant.Recipe.bnn(),
                            example_inputs=(torch.randn(2, 1, 8, 8),))
        ops = [(r[0], r[1]) for r in _table(fxquant.summary(prepared))]
        assert ops == [("0", "conv2d"), ("1", "BatchNorm2d"), ("2", "conv2d"),
                       ("3", "BatchNorm2d"), ("4", "MaxPool2d"), ("5", "Flatten"),
                       ("6", "linear")]

    def test_a_layer_only_the_other_mode_runs_still_counts(self):
        prepared = _prepare(AuxHead(), fxquant.Recipe(weight="ste_sign"),
                            example_inputs=(torch.randn(2, 6),))
        train, eval_ = fxquant.summary(prepared.train()), fxquant.summary(prepared.eval())
        assert ["aux", "(train mode only)"] == _table(eval_)[-1][:2]
        for key in ("Total params", "Model size", "Float-32 equivalent"):
            assert _totals(train)[key] == _totals(eval_)[key]


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
        assert totals["Model size"] == f"{stored / 1024:.2f} KiB"
        assert totals["Total params"] == "896"
        assert totals["Non-trainable params"] == "864"  # the packed constants

    def test_same_parameter_count_and_float32_equivalent_as_the_prepared_model(self):
        # batch norm after the binary layer stays a batch norm: nothing folds into a float layer
        model = nn.Sequential(nn.Linear(8, 16), nn.Hardtanh(), nn.Linear(16, 16),
                              nn.BatchNorm1d(16), nn.Hardtanh(), nn.Linear(16, 4))
        prepared = _prepare(model, fxquant.Recipe.bnn(), example_inputs=(torch.randn(1, 8),))
        before = _totals(fxquant.summary(prepared))
        after = _totals(fxquant.summary(fxquant.convert(prepared)))
        params = 8 * 16 + 16 + 16 * 16 + 16 + 2 * 16 + 16 * 4 + 4
        assert before["Total params"] == after["Total params"] == f"{params:,}"
        assert before["Float-32 equivalent"] == after["Float-32 equivalent"]
        assert after["Non-trainable params"] == f"{16 * 16:,}"  # the packed binary weights

    @pytest.mark.parametrize("bias", [False, True])
    def test_a_batch_norm_folded_into_a_float_conv_still_counts(self, bias):
        # Recipe.bnn() leaves the first conv float: batch norm 1 folds into its weight and bias
        model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=bias), nn.BatchNorm2d(4),
                              nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Flatten(),
                              nn.Linear(8 * 8 * 8, 3))
        x = torch.randn(2, 1, 8, 8)
        prepared = _prepare(model, fxquant.Recipe.bnn(), example_inputs=(x,))
        converted = fxquant.convert(prepared)
        assert "1" not in dict(converted.named_modules())  # batch norm 1 is gone
        before = _totals(fxquant.summary(prepared))
        after = _totals(fxquant.summary(converted))
        params = sum(p.numel() for p in model.parameters())  # torch's count, the oracle
        assert before["Total params"] == after["Total params"] == f"{params:,}"
        assert before["Float-32 equivalent"] == after["Float-32 equivalent"] == (
            f"{params * 4 / 1024:,.2f} KiB")
        packed = 4 * 8 * 3 * 3  # conv 2's binary weights: constants, not trainable
        assert after["Non-trainable params"] == f"{packed:,}"
        assert after["Trainable params"] == f"{params - packed:,}"
        conv0 = _table(fxquant.summary(converted))[0]
        assert conv0[:2] == ["0", "conv2d"] and conv0[5] == f"{4 * 9 + 4 * bias + 8}"
        # memory stays the bytes stored: the folded weight and its bias, gained or not
        stored = sum(t.numel() * t.element_size() for t in converted.state_dict().values())
        assert after["Model size"] == f"{stored / 1024:.2f} KiB"

    def test_save_and_load_of_a_converted_model_gives_the_same_summary(self, tmp_path):
        x = torch.randn(1, 1, 8, 8)
        prepared = _prepare(_bnn_cnn(), fxquant.Recipe.bnn(), example_inputs=(x,))
        converted = fxquant.convert(prepared)
        fxquant.save(converted, tmp_path / "c.fxq")
        loaded = fxquant.load(tmp_path / "c.fxq", _bnn_cnn())
        text = fxquant.summary(loaded, example_inputs=(x,))
        assert text == fxquant.summary(converted, example_inputs=(x,))
        assert _totals(text)["Total params"] == _totals(fxquant.summary(prepared))["Total params"]

    def test_lowered_input_quantizers_still_count_as_binary_macs(self):
        prepared = fxquant.prepare(MLP(), fxquant.Recipe.bnn(),
                                   example_inputs=(torch.randn(2, 64),))
        converted = fxquant.convert(prepared)
        key = "Ratio of MACs that are binarized"
        assert _totals(fxquant.summary(converted))[key] == _totals(fxquant.summary(prepared))[key]
        (_, fc2, _) = layer_stats(converted)
        assert (fc2.input_quantizer, fc2.input_bits, fc2.weight_bits) == ("ste_sign", 1, 1)


class TestUnits:
    def test_memory_column_and_totals_switch_to_mib_for_large_models(self):
        prepared = fxquant.prepare(nn.Sequential(nn.Linear(1024, 512), nn.Linear(512, 4)),
                                   fxquant.Recipe())
        text = fxquant.summary(prepared)
        params = 1024 * 512 + 512 + 512 * 4 + 4
        assert "Memory (MiB)" in text.splitlines()[0]
        assert _column(text, "Memory (MiB)") == ["2.00", "0.01"]  # 2,099,200 B; 8,208 B
        assert _totals(text)["Model size"] == f"{params * 4 / 2**20:.2f} MiB"
        assert _totals(text)["Float-32 equivalent"] == f"{params * 4 / 2**20:.2f} MiB"

    def test_ternarized_line_only_when_there_are_ternary_macs(self):
        prepared = fxquant.prepare(nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4)),
                                   fxquant.Recipe(weight="ste_tern", input="ste_tern"),
                                   example_inputs=(torch.randn(1, 8),))
        assert _totals(fxquant.summary(prepared))["Ratio of MACs that are ternarized"] == "1.0000"


def test_linear_macs_count_every_position_whatever_the_batch_dim():
    class SeqFirst(nn.Module):  # (L, N, E), as attention runs its projections
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 5)

        def forward(self, x):
            return self.fc(x.transpose(0, 1))

    prepared = fxquant.prepare(SeqFirst(), fxquant.Recipe(weight="ste_sign"),
                               example_inputs=(torch.randn(2, 7, 6),))
    (stats,) = layer_stats(prepared)
    assert stats.output_shape == (7, 2, 5)
    assert stats.macs == 6 * 5 * 7  # weights x positions of one sample


def test_summary_returns_text_and_prints_nothing(capsys):
    text = fxquant.summary(fxquant.prepare(MLP(), fxquant.Recipe.bnn()))
    assert isinstance(text, str) and "fc2" in text
    assert capsys.readouterr() == ("", "")


class TestWhatSummaryAccepts:
    def test_a_plain_module_asks_for_prepare(self):
        with pytest.raises(TypeError, match=r"call fxquant.prepare\(model, recipe\) first"):
            fxquant.summary(MLP())
        with pytest.raises(TypeError, match="fxquant.prepare"):
            layer_stats(torch.fx.symbolic_trace(MLP()))

    def test_a_data_parallel_wrapper_is_looked_through(self):
        prepared = fxquant.prepare(MLP(), fxquant.Recipe.bnn(),
                                   example_inputs=(torch.randn(2, 64),))
        assert fxquant.summary(nn.DataParallel(prepared)) == fxquant.summary(prepared)

    @pytest.mark.parametrize("call", ["prepare", "summary"])
    def test_a_bare_tensor_as_example_inputs_says_to_pass_a_tuple(self, call):
        x = torch.randn(2, 64)
        with pytest.raises(TypeError, match=r"pass example_inputs=\(x,\)"):
            if call == "prepare":
                fxquant.prepare(MLP(), fxquant.Recipe.bnn(), example_inputs=x)
            else:
                fxquant.summary(fxquant.prepare(MLP(), fxquant.Recipe.bnn()), example_inputs=x)

    def test_a_list_of_inputs_is_accepted(self):
        prepared = fxquant.prepare(MLP(), fxquant.Recipe.bnn(),
                                   example_inputs=[torch.randn(2, 64)])
        assert layer_stats(prepared)[0].output_shape == (2, 32)


class TestShapeRecording:
    def test_a_batch_of_one_passes_batch_norm_of_a_training_model(self):
        model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).train()
        prepared = fxquant.prepare(model, fxquant.Recipe(weight="ste_sign"),
                                   example_inputs=(torch.randn(1, 4),))
        assert layer_stats(prepared)[0].output_shape == (1, 4)
        assert prepared.training and prepared.get_submodule("1").training

    def test_every_modules_own_mode_buffers_and_rng_are_restored(self):
        model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5),
                              nn.Linear(4, 2)).train()
        prepared = fxquant.prepare(model, fxquant.Recipe(weight="ste_sign"))
        prepared.get_submodule("1").eval()  # a frozen batch norm inside a training model
        flags = {name: m.training for name, m in prepared.named_modules()}
        state = {k: v.clone() for k, v in prepared.state_dict().items()}
        x = torch.randn(8, 4)
        rng = torch.get_rng_state()
        record_shapes(prepared, (x,))
        assert {name: m.training for name, m in prepared.named_modules()} == flags
        assert all(torch.equal(v, state[k]) for k, v in prepared.state_dict().items())
        assert prepared.get_submodule("1").num_batches_tracked.item() == 0
        assert torch.equal(torch.get_rng_state(), rng)

    def test_a_failing_node_is_named_once_and_nothing_is_printed(self, capsys):
        prepared = fxquant.prepare(MLP(), fxquant.Recipe.bnn())
        with pytest.raises(RuntimeError, match="at node 'fc1'") as info:
            record_shapes(prepared, (torch.randn(2, 10),))
        assert str(info.value).count("example_inputs failed") == 1
        assert "mat1 and mat2" in str(info.value)
        assert capsys.readouterr() == ("", "")

    def test_both_mode_graphs_are_recorded(self):
        prepared = fxquant.prepare(AuxHead(), fxquant.Recipe(weight="ste_sign"))
        record_shapes(prepared, (torch.randn(1, 6),))
        for mode in (True, False):
            nodes = [n for n in prepared.train(mode).graph.nodes if n.op == "call_function"]
            assert nodes and all("tensor_meta" in n.meta for n in nodes)
        assert int(prepared.calls) == 0


def test_input_bits_seen_through_pooling_and_flatten():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3))
    recipe = fxquant.Recipe(weight="ste_sign", output="ste_sign").for_last(output=None)
    prepared = fxquant.prepare(model, recipe, example_inputs=(torch.randn(1, 1, 8, 8),))
    conv, fc = layer_stats(prepared)
    assert (conv.input_bits, fc.input_quantizer, fc.input_bits) == (32, "ste_sign", 1)
    assert fc.mac_bits == 1
