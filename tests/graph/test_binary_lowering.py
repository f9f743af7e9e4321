"""lower_binary_layers: binary Conv2d/Linear layers run as the packed-bit ops after convert.

Oracles: the prepared model in eval mode (what convert must reproduce) and hand-written
formulas: ``F.conv2d(where(x >= 0, 1, -1), sign(w))`` in float64 for the integer dot products.
"""

from __future__ import annotations

import copy
import math
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant import api
from fxquant.graph.meta import get_record
from fxquant.graph.passes import lower_binary_layers
from fxquant.kernels import unpack_binary_weight
from fxquant.ops import PackedWeight
from tests.helpers import exact
from tests.models import BiRealResNet, Twice

BINARY_OPS = {torch.ops.fxquant.binary_conv2d.default, torch.ops.fxquant.binary_linear.default}
U = 2.0 ** -24


def _prepare(model: nn.Module, recipe: fxquant.Recipe) -> torch.fx.GraphModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-negative input advice is not under test here
        return fxquant.prepare(model, recipe)


def _binary_calls(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in BINARY_OPS]


def _awkward(*shape: int) -> torch.Tensor:
    """Random values with exact zeros, -0.0, ±inf and NaN mixed in."""
    x = torch.randn(*shape)
    flat = x.view(-1)
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-45, -1e-45])
    where = torch.randperm(flat.numel())[: min(flat.numel() // 3, 7 * 5)]
    flat[where] = specials.repeat(len(where) // 7 + 1)[: len(where)]
    return x


def _sign(x: torch.Tensor) -> torch.Tensor:
    """The sign convert's models use, written out: +1 for x >= 0 (-0.0, +inf), NaN kept."""
    return torch.where(torch.isnan(x), x, torch.where(x >= 0, 1.0, -1.0))


def _with_statistics(model: nn.Module) -> nn.Module:
    """Batch norms with non-trivial running statistics and affine parameters."""
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-2, 2)
            m.running_var.uniform_(0.1, 3)
            m.weight.data.uniform_(-2, 2)
            m.bias.data.uniform_(-1, 1)
    return model.eval()


class _Conv(nn.Module):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(*args, **kwargs)

    def forward(self, x):
        return self.conv(x)


# (in, out, kernel, stride, padding, dilation, groups, padding_mode)
CONVS = {
    "odd_channels": (3, 5, 3, 1, 1, 1, 1, "zeros"),
    "one_word_and_one_bit": (65, 7, 3, 1, 1, 1, 1, "zeros"),
    "stride_2": (16, 8, 3, 2, 1, 1, 1, "zeros"),
    "dilation_2": (10, 6, 3, 1, 2, 2, 1, "zeros"),
    "groups_3": (9, 6, 3, 1, 1, 1, 3, "zeros"),
    "depthwise": (12, 12, 3, 1, 1, 1, 12, "zeros"),
    "pointwise": (130, 3, 1, 1, 0, 1, 1, "zeros"),
    "asymmetric_padding": (4, 4, (3, 1), (2, 1), (2, 0), 1, 1, "zeros"),
    "same": (5, 4, 5, 1, "same", 1, 1, "zeros"),
    "same_dilated": (5, 4, 3, 1, "same", 3, 1, "zeros"),
    "valid": (5, 4, 3, 1, "valid", 1, 1, "zeros"),
    "reflect": (6, 4, 3, 1, 1, 1, 1, "reflect"),
}


class TestConv2d:
    @pytest.mark.parametrize("case", sorted(CONVS))
    def test_sign_layers_run_as_the_op_bit_for_bit(self, case):
        cin, cout, k, s, p, d, g, mode = CONVS[case]
        torch.manual_seed(0)
        model = _Conv(cin, cout, k, s, p, d, g, bias=False, padding_mode=mode)
        prepared = _prepare(model, fxquant.Recipe(weight="ste_sign", input="ste_sign"))
        converted = fxquant.convert(prepared)
        converted.graph.lint()
        (call,) = _binary_calls(converted)
        assert not any(isinstance(m, PackedWeight) for m in converted.modules())
        awkward = _awkward(2, cin, 9, 8)
        for x in (awkward, awkward.nan_to_num(0.0, math.inf, -math.inf)):  # NaN: another path
            padded = x if mode == "zeros" else F.pad(
                x, model.conv._reversed_padding_repeated_twice, mode=mode)
            expected = F.conv2d(_sign(padded).double(), torch.sign(model.conv.weight).double()
                                .where(model.conv.weight != 0, 1.0), None, s,
                                p if mode == "zeros" else 0, d, g).float()
            exact(converted(x), expected)
            exact(converted(x), prepared.eval()(x))

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
    def test_other_dtypes_are_lowered_too_and_stay_exact(self, dtype):
        # the graph must not depend on the dtype: fxquant.load converts a fresh float32 model
        model = _Conv(70, 6, 3, padding=1, bias=False).to(dtype)
        prepared = _prepare(model, fxquant.Recipe(weight="ste_sign", input="ste_sign"))
        converted = fxquant.convert(prepared)
        assert len(_binary_calls(converted)) == 1
        x = _awkward(2, 70, 5, 5).to(dtype)
        exact(converted(x), prepared.eval()(x))

    def test_an_unbatched_input_works_as_in_the_prepared_model(self):
        model = _Conv(3, 4, 3, padding=1, bias=False)
        prepared = _prepare(model, fxquant.Recipe(weight="ste_sign", input="ste_sign"))
        x = _awkward(3, 6, 6)
        exact(fxquant.convert(prepared)(x), prepared.eval()(x))

    def test_batch_norm_after_the_op_stays_exact(self):
        model = _with_statistics(BiRealResNet((1, 1, 1, 1), width=8))
        prepared = _prepare(model, fxquant.Recipe.bnn())
        converted = fxquant.convert(prepared)
        converted.graph.lint()
        binary = [n for n in prepared.graph.nodes if (r := get_record(n)) is not None
                  and r.role == "layer" and r.spec("input") is not None]
        assert len(_binary_calls(converted)) == len(binary) == 11
        x = _awkward(3, 3, 16, 16)
        exact(converted(x), prepared.eval()(x))


class TestLinear:
    @pytest.mark.parametrize("shape", [(5, 70), (2, 3, 130), (1, 64)])
    def test_2d_and_3d_inputs_bit_for_bit(self, shape):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(shape[-1], 9, bias=False))
        prepared = _prepare(model, fxquant.Recipe(weight="approx_sign", input="swish_sign"))
        converted = fxquant.convert(prepared)
        (call,) = _binary_calls(converted)
        assert call.target is torch.ops.fxquant.binary_linear.default
        weight = torch.where(model[0].weight >= 0, 1.0, -1.0)
        awkward = _awkward(*shape)
        for x in (awkward, awkward.nan_to_num(0.0, math.inf, -math.inf)):  # NaN: another path
            exact(converted(x), F.linear(_sign(x).double(), weight.double()).float())
            exact(converted(x), prepared.eval()(x))


class TestScaledWeights:
    """±α per output channel (XNOR / Bi-Real): the op computes round(α·dot) once; the prepared
    float layer rounds its sum of ±α terms, at most (K + 1)·K·α·2**-24 away for a fan-in K
    (each of fewer than K additions rounds a partial sum of magnitude <= K·α)."""

    LAYERS = {"linear": (lambda: nn.Linear(200, 31, bias=False), (6, 200), F.linear),
              "conv": (lambda: nn.Conv2d(31, 17, 3, padding=1, bias=False), (2, 31, 5, 7),
                       lambda a, b: F.conv2d(a, b, padding=1))}

    @pytest.mark.parametrize("input_quantizer", ["ste_sign", "approx_sign"])
    @pytest.mark.parametrize("kind", sorted(LAYERS))
    def test_the_op_rounds_alpha_times_the_exact_dot_product_once(self, kind, input_quantizer):
        build, shape, fn = self.LAYERS[kind]
        torch.manual_seed(0)
        model = nn.Sequential(build())
        prepared = _prepare(model, fxquant.Recipe(weight="magnitude_aware_sign",
                                                  input=input_quantizer))
        converted = fxquant.convert(prepared)
        assert len(_binary_calls(converted)) == 1
        w = model[0].weight
        alpha = w.abs().flatten(1).mean(1)  # magnitude_aware_sign's α, per output channel
        view = (-1,) if w.dim() == 2 else (-1, 1, 1)
        fan_in = w[0].numel()
        awkward = _awkward(*shape)
        for x in (awkward, awkward.nan_to_num(0.0, math.inf, -math.inf)):  # NaN: another path
            dot = fn(_sign(x).double(), torch.where(w >= 0, 1.0, -1.0).double())
            exact(converted(x), (dot * alpha.double().view(view)).float())
            diff = (converted(x) - prepared.eval()(x)).abs().nan_to_num(0.0)
            assert (diff <= (fan_in + 1) * fan_in * alpha.view(view) * U).all()

    def test_bireal_recipe_with_batch_norm_stays_close(self):
        model = _with_statistics(BiRealResNet((1, 1, 1, 1), width=8))
        prepared = _prepare(model, fxquant.Recipe.bireal())
        converted = fxquant.convert(prepared)
        assert len(_binary_calls(converted)) == 11
        x = torch.randn(2, 3, 16, 16)
        torch.testing.assert_close(converted(x), prepared.eval()(x), rtol=1e-4, atol=1e-4)


class TestTodaysPath:
    """Layers the op does not take keep F.conv*/F.linear on the unpacked weight, exactly."""

    CASES = {
        "bias": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)),
                 fxquant.Recipe(weight="ste_sign", input="ste_sign"), (2, 3, 6, 6)),
        "uneven_same_padding": (lambda: nn.Sequential(nn.Conv2d(3, 4, 2, padding="same",
                                                                bias=False)),
                                fxquant.Recipe(weight="ste_sign", input="ste_sign"), (2, 3, 6, 6)),
        "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 4, 3, bias=False)),
                   fxquant.Recipe(weight="ste_sign", input="ste_sign"), (2, 3, 9)),
        "conv_transpose": (lambda: nn.Sequential(nn.ConvTranspose2d(3, 4, 3, bias=False)),
                           fxquant.Recipe(weight="ste_sign", input="ste_sign"), (2, 3, 5, 5)),
        "ternary_weights": (lambda: nn.Sequential(nn.Linear(8, 4, bias=False)),
                            fxquant.Recipe(weight="ste_tern", input="ste_sign"), (2, 8)),
        "float_weights": (lambda: nn.Sequential(nn.Linear(8, 4, bias=False)),
                          fxquant.Recipe(input="ste_sign"), (2, 8)),
        "float_inputs": (lambda: nn.Sequential(nn.Linear(8, 4, bias=False)),
                         fxquant.Recipe(weight="ste_sign"), (2, 8)),
        "heaviside_inputs": (lambda: nn.Sequential(nn.Linear(8, 4, bias=False)),
                             fxquant.Recipe(weight="ste_sign", input="ste_heaviside"), (2, 8)),
    }

    @pytest.mark.parametrize("case", sorted(CASES))
    def test_is_not_lowered_and_stays_exact(self, case):
        build, recipe, shape = self.CASES[case]
        torch.manual_seed(0)
        prepared = _prepare(build(), recipe)
        converted = fxquant.convert(prepared)
        assert not _binary_calls(converted)
        x = _awkward(*shape).to(next(prepared.parameters()).dtype)
        exact(converted(x), prepared.eval()(x))

    def test_a_weight_the_forward_also_reads_keeps_todays_path(self):
        class ReadsDtype(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.fc = nn.Linear(8, 4, bias=False)

            def forward(self, x):
                return self.fc(x.to(self.fc.weight.dtype))

        prepared = _prepare(ReadsDtype(), fxquant.Recipe(weight="ste_sign", input="ste_sign"))
        converted = fxquant.convert(prepared)
        assert not _binary_calls(converted)
        x = _awkward(2, 8)
        exact(converted(x), prepared.eval()(x))


class TestGraph:
    def test_records_name_the_layer_its_input_quantizer_and_the_packed_tensors(self):
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 5, bias=False), nn.Linear(5, 2))
        converted = fxquant.convert(_prepare(model, fxquant.Recipe(
            weight="ste_sign", input="approx_sign", keep_first_last=True)))
        (call,) = _binary_calls(converted)
        record = get_record(call)
        assert (record.role, record.layer, record.op) == ("layer", "1", "linear")
        assert (record.quantizer, record.bits) == ("approx_sign", 1)
        bits = get_record(call.args[1])
        assert bits.role == "packed_weight" and bits.tensors == ("1.weight_bits", "1.weight_scale")
        assert (bits.quantizer, bits.bits, bits.numel) == ("ste_sign", 1, 40)
        assert api.is_converted(converted)
        state = converted.state_dict()
        assert "1.weight" not in state and state["1.weight_bits"].dtype == torch.uint8
        exact(unpack_binary_weight(state["1.weight_bits"], state["1.weight_scale"], 8),
              torch.where(model[1].weight >= 0, 1.0, -1.0))
        assert "torch.ops.fxquant.binary_linear.default" in converted.code

    def test_a_layer_called_twice_packs_its_weight_once(self):
        model = Twice()
        model.fc.bias = None
        prepared = _prepare(model, fxquant.Recipe(weight="ste_sign", input="ste_sign"))
        converted = fxquant.convert(prepared)
        first, second = _binary_calls(converted)
        assert first.args[1] is second.args[1]
        assert [k for k in converted.state_dict() if k.startswith("fc.")] == [
            "fc.weight_bits", "fc.weight_scale"]
        x = _awkward(4, 3)
        exact(converted(x), prepared.eval()(x))

    def test_the_pass_alone_on_a_graph_without_binary_layers_changes_nothing(self):
        gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
        code = gm.code
        gm = lower_binary_layers(gm)
        gm.recompile()
        assert gm.code == code


class TestMemoryAndFiles:
    def _converted(self, width: int = 64) -> tuple[nn.Module, torch.fx.GraphModule]:
        model = _with_statistics(BiRealResNet((1, 1, 1, 1), width=width))
        return model, fxquant.convert(_prepare(model, fxquant.Recipe.bnn()))

    @pytest.mark.parametrize("width", [16, 64])  # 16: 16-channel rows (2 bytes each)
    def test_resident_weight_bytes_are_within_1_1x_of_one_bit_per_weight(self, width):
        model, converted = self._converted(width)
        records = [get_record(n.args[1]) for n in _binary_calls(converted)]
        theoretical = sum(math.ceil(r.numel / 8) for r in records)
        resident = {id(t): t.numel() * t.element_size() for r in records
                    for t in (converted.get_buffer(k) for k in r.tensors)}
        assert sum(resident.values()) <= 1.1 * theoretical
        # and nothing else the converted model holds is as large as a float copy of them
        float_binary = 4 * sum(r.numel for r in records)
        every = {id(t): t.numel() * t.element_size()
                 for t in [*converted.parameters(), *converted.buffers()]}
        assert sum(every.values()) - sum(resident.values()) < 0.1 * float_binary

    @pytest.mark.parametrize("cin", [3, 7, 65])
    def test_rows_of_channels_that_do_not_fill_a_byte_are_padded_to_a_byte_only(self, cin):
        recipe = fxquant.Recipe(weight="ste_sign", input="ste_sign")
        for model, kernel in ((_Conv(cin, 6, 3, padding=1, bias=False), (3, 3)),
                              (nn.Sequential(nn.Linear(cin, 6, bias=False)), ())):
            prepared = _prepare(model, recipe)
            converted = fxquant.convert(prepared)
            (call,) = _binary_calls(converted)
            bits = converted.get_buffer(get_record(call.args[1]).tensors[0])
            # one row per (out, kh, kw): ceil(cin / 8) bytes, at most 7 padding bits
            assert tuple(bits.shape) == (6, *kernel, (cin + 7) // 8)
            assert 8 * bits.numel() - 6 * math.prod(kernel) * cin < 8 * 6 * math.prod(kernel)
            x = _awkward(2, cin, 5, 5) if kernel else _awkward(2, cin)
            exact(converted(x), prepared.eval()(x))

    def test_save_and_load_round_trip(self, tmp_path):
        model, converted = self._converted(width=8)
        fxquant.save(converted, tmp_path / "c.fxq")
        loaded = fxquant.load(tmp_path / "c.fxq", BiRealResNet((1, 1, 1, 1), width=8))
        assert len(_binary_calls(loaded)) == len(_binary_calls(converted))
        x = _awkward(2, 3, 16, 16)
        exact(loaded(x), converted(x))

    def test_a_file_saved_before_the_op_existed_still_loads(self, tmp_path, monkeypatch):
        model, converted = self._converted(width=8)
        old_lower = tuple(p for p in api.LOWER if p is not lower_binary_layers)
        with monkeypatch.context() as m:
            m.setattr(api, "LOWER", old_lower)
            old = fxquant.convert(_prepare(model, fxquant.Recipe.bnn()))
        assert not _binary_calls(old) and "layer1.0.conv1.weight_packed.codes" in old.state_dict()
        fxquant.save(old, tmp_path / "old.fxq")
        loaded = fxquant.load(tmp_path / "old.fxq", BiRealResNet((1, 1, 1, 1), width=8))
        assert _binary_calls(loaded)
        x = _awkward(2, 3, 16, 16)
        exact(loaded(x), old(x))
        for key, value in converted.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key

    @pytest.mark.parametrize("copy_of", [lambda m: m, copy.deepcopy,
                                         lambda m: pickle.loads(pickle.dumps(m))],
                             ids=["converted", "deepcopy", "pickle"])
    def test_a_float_checkpoint_says_load_before_convert(self, copy_of):
        model, converted = self._converted(width=8)
        converted = copy_of(converted)
        with pytest.raises(RuntimeError, match=r"layer1\.0\.conv1\.weight.*then convert"):
            converted.load_state_dict(model.state_dict(), strict=False)
        converted.load_state_dict(copy.deepcopy(converted.state_dict()))  # its own: fine

    @pytest.mark.parametrize("copy_of", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))],
                             ids=["deepcopy", "pickle"])
    def test_a_weight_of_the_root_module_keeps_the_guard_in_copies(self, copy_of):
        class Functional(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.weight = nn.Parameter(torch.randn(5, 8))

            def forward(self, x):
                return F.linear(x, self.weight)

        model = Functional()
        prepared = _prepare(model, fxquant.Recipe(weight="ste_sign", input="ste_sign"))
        converted = copy_of(fxquant.convert(prepared))
        assert list(converted.state_dict()) == ["weight_bits", "weight_scale"]
        x = _awkward(3, 8)
        exact(converted(x), F.linear(_sign(x), torch.where(model.weight >= 0, 1.0, -1.0)))
        with pytest.raises(RuntimeError, match=r"\(weight\).*then convert"):
            converted.load_state_dict(model.state_dict(), strict=False)

    def test_torch_export_keeps_the_op_and_the_packed_bytes(self, tmp_path):
        _, converted = self._converted(width=8)
        x = _awkward(2, 3, 16, 16).nan_to_num(0.0)
        program = torch.export.export(converted, (x,))
        targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
        assert targets.count(torch.ops.fxquant.binary_conv2d.default) == 11
        float_convs = (torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default)
        assert sum(t in float_convs for t in targets) == 1  # the float stem only
        assert any(t.dtype == torch.uint8 for t in program.state_dict.values()) or any(
            t.dtype == torch.uint8 for t in program.constants.values())
        exact(program.module()(x), converted(x))
        torch.export.save(program, tmp_path / "m.pt2")
        exact(torch.export.load(tmp_path / "m.pt2").module()(x), converted(x))
