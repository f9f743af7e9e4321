"""Export of packed low-bit layers: ONNX (dynamo and legacy exporters) and torch.export (.pt2).

The oracle of a binary layer is its float formula written out here, ``conv2d(sign(x), W)`` with
the ±1 (or ±α) float weight ``W`` the bits were packed from; onnxruntime must reproduce it (and
the eager op) exactly: a ±1 convolution is a sum of integers. The files must hold the weights as
``uint8`` bytes, never as a float tensor of the weight's size.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant.kernels import pack_binary_weight
from tests.models import BiRealResNet

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from fxquant.kernels import onnx as fxonnx  # noqa: E402 - after the skips

EXPORTERS = [pytest.param(True, id="dynamo"), pytest.param(False, id="legacy")]


def _sign(x):
    return torch.where(x >= 0, 1.0, -1.0)


def _input(*shape, seed=0):
    """Gaussian input with exact zeros of both signs (sign(-0.0) = +1)."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    x.view(-1)[:4] = torch.tensor([0.0, -0.0, 0.0, -0.0])
    return x


def _binary_weight(shape, scaled, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(0, 2, shape, generator=g).float() * 2 - 1
    if scaled:  # XNOR / Bi-Real: one magnitude per output channel
        w = w * torch.rand(shape[0], *[1] * (len(shape) - 1), generator=g)
    return w


class BinaryConv(nn.Module):
    """A converted binary conv as lower_binary_layers builds it: packed buffers, one op call."""

    def __init__(self, weight, bias, stride, padding, dilation, groups):
        super().__init__()
        bits, scale = pack_binary_weight(weight)
        self.register_buffer("weight_bits", bits)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", bias)
        self.conv_args = (list(stride), list(padding), list(dilation), groups)

    def forward(self, x):
        return torch.ops.fxquant.binary_conv2d(x, self.weight_bits, self.weight_scale, self.bias,
                                               *self.conv_args)


class BinaryLinear(nn.Module):
    def __init__(self, weight, bias):
        super().__init__()
        bits, scale = pack_binary_weight(weight)
        self.register_buffer("weight_bits", bits)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", bias)

    def forward(self, x):
        return torch.ops.fxquant.binary_linear(x, self.weight_bits, self.weight_scale, self.bias)


def _export(model, x, path, dynamo):
    fxonnx.export(model.eval(), (x,), path, dynamo=dynamo, input_names=["x"])
    return onnx.load(str(path))


def _run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


def _initializers(model):
    return {i.name: (i.data_type, tuple(i.dims)) for i in model.graph.initializer}


def _assert_packed(model, weight_bits, weight_numel):
    """The packed bytes are an initializer; no float initializer is as large as the weight."""
    inits = _initializers(model).values()
    assert (onnx.TensorProto.UINT8, tuple(weight_bits.shape)) in inits
    floats = [dims for dtype, dims in inits if dtype != onnx.TensorProto.UINT8]
    assert all(torch.Size(dims).numel() < weight_numel for dims in floats), floats


CONVS = {  # cin, cout, kernel, stride, padding, dilation, groups, bias, scaled
    "3x3": (16, 32, (3, 3), (1, 1), (1, 1), (1, 1), 1, False, False),
    "odd-channels-bias-scale": (5, 7, (3, 3), (1, 1), (1, 1), (1, 1), 1, True, True),
    "stride-dilation-asymmetric": (8, 6, (3, 2), (2, 1), (2, 0), (2, 1), 1, True, True),
    "groups": (12, 6, (3, 3), (1, 2), (1, 1), (1, 1), 3, False, True),
    "depthwise-70-channels": (70, 70, (3, 3), (1, 1), (1, 1), (1, 1), 70, True, False),
    "1x1-wide": (130, 9, (1, 1), (1, 1), (0, 0), (1, 1), 1, True, True),
}


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("config", CONVS.values(), ids=CONVS.keys())
def test_binary_conv_exports_packed_and_onnxruntime_equals_the_formula(config, dynamo, tmp_path):
    cin, cout, kernel, stride, padding, dilation, groups, has_bias, scaled = config
    weight = _binary_weight((cout, cin // groups, *kernel), scaled)
    bias = torch.randn(cout) if has_bias else None
    model = BinaryConv(weight, bias, stride, padding, dilation, groups)
    x = _input(2, cin, 9, 8)
    onnx_model = _export(model, x, tmp_path / "conv.onnx", dynamo)

    _assert_packed(onnx_model, model.weight_bits, weight.numel())
    signs = weight.sign()  # the oracle: ±1 conv (integer sums), then the channel scale and bias
    expected = F.conv2d(_sign(x), signs, None, stride, padding, dilation, groups)
    expected = expected * weight.abs().amax(dim=(1, 2, 3)).view(-1, 1, 1)
    expected = expected if bias is None else expected + bias.view(-1, 1, 1)
    got = _run(tmp_path / "conv.onnx", x)
    assert torch.equal(got, expected)
    assert torch.equal(got, model(x))


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize(("shape", "has_bias", "scaled"),
                         [((3, 70), True, True), ((2, 3, 64), False, False)],
                         ids=["odd-features-bias-scale", "3d-input"])
def test_binary_linear_exports_packed_and_onnxruntime_equals_the_formula(shape, has_bias, scaled,
                                                                         dynamo, tmp_path):
    weight = _binary_weight((9, shape[-1]), scaled)
    bias = torch.randn(9) if has_bias else None
    model = BinaryLinear(weight, bias)
    x = _input(*shape)
    onnx_model = _export(model, x, tmp_path / "linear.onnx", dynamo)

    _assert_packed(onnx_model, model.weight_bits, weight.numel())
    expected = F.linear(_sign(x), weight.sign()) * weight.abs().amax(dim=1)
    expected = expected if bias is None else expected + bias
    got = _run(tmp_path / "linear.onnx", x)
    assert torch.equal(got, expected)
    assert torch.equal(got, model(x))


def test_the_translation_table_keeps_bits_packed_through_a_plain_dynamo_export(tmp_path):
    """torch.onnx.export with the table (and optimize=False, as documented): bits stay packed."""
    weight = _binary_weight((8, 8, 3, 3), scaled=True)
    model = BinaryConv(weight, None, (1, 1), (1, 1), (1, 1), 1).eval()
    x = _input(1, 8, 5, 5)
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False, input_names=["x"],
                                optimize=False,
                                custom_translation_table=fxonnx.custom_translation_table())
    program.save(str(tmp_path / "plain.onnx"), external_data=False)
    _assert_packed(onnx.load(str(tmp_path / "plain.onnx")), model.weight_bits, weight.numel())
    assert torch.equal(_run(tmp_path / "plain.onnx", x), model(x))


def test_onnx_file_of_a_large_layer_is_at_most_1_2_times_its_saved_state_dict(tmp_path):
    weight = _binary_weight((256, 256, 3, 3), scaled=True)
    model = BinaryConv(weight, torch.randn(256), (1, 1), (1, 1), (1, 1), 1)
    x = _input(1, 256, 4, 4)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    for dynamo in (True, False):
        _export(model, x, tmp_path / "big.onnx", dynamo)
        assert (tmp_path / "big.onnx").stat().st_size <= 1.2 * buffer.getbuffer().nbytes


def test_opset_without_bitwise_and_is_refused_with_the_first_that_works(tmp_path):
    model = BinaryLinear(_binary_weight((2, 3), False), None)
    with pytest.raises(ValueError, match="opset_version=17 .* use 18"):
        fxonnx.export(model, (torch.ones(1, 3),), tmp_path / "m.onnx", opset_version=17)


def test_pt2_of_packed_layers_is_small_and_loads_equal_to_eager(tmp_path):
    model = nn.Sequential(
        BinaryConv(_binary_weight((256, 256, 3, 3), True), torch.randn(256), (1, 1), (1, 1),
                   (1, 1), 1),
        nn.Flatten(), BinaryLinear(_binary_weight((10, 256 * 4), True), torch.randn(10))).eval()
    x = _input(1, 256, 2, 2)  # .pt2 files also hold the example input
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "m.pt2")
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    assert (tmp_path / "m.pt2").stat().st_size <= 1.2 * buffer.getbuffer().nbytes
    loaded = torch.export.load(tmp_path / "m.pt2").module()
    assert torch.equal(loaded(x), model(x))
    assert "torch.ops.fxquant.binary_conv2d" in loaded.code


class SmallConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.tanh(self.conv3(torch.tanh(self.conv2(torch.tanh(self.conv1(x))))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("recipe", ["twn", "dorefa"])
def test_packed_weight_codes_stay_packed_in_onnx(recipe, dynamo, tmp_path):
    """Ternary (2-bit codes) and k-bit (uint8 codes + table) weights export as their codes; the
    float weight is unpacked by the graph, and onnxruntime's float convolution agrees with the
    converted model up to float rounding (the weights are scaled)."""
    torch.manual_seed(0)
    converted = fxquant.convert(fxquant.prepare(SmallConvNet(), getattr(fxquant.Recipe, recipe)()))
    packed = {name: m for name, m in converted.named_modules()
              if isinstance(m, fxquant.ops.PackedWeight)}
    assert packed
    x = _input(2, 3, 6, 6)
    onnx_model = _export(converted, x, tmp_path / "m.onnx", dynamo)
    inits = list(_initializers(onnx_model).values())
    for module in packed.values():
        assert (onnx.TensorProto.UINT8, tuple(module.codes.shape)) in inits
        assert all(torch.Size(dims).numel() < torch.Size(module.shape).numel()
                   for dtype, dims in inits if dtype == onnx.TensorProto.FLOAT)
    expected = converted(x).detach()
    torch.testing.assert_close(_run(tmp_path / "m.onnx", x), expected, rtol=1e-5, atol=1e-5)


def _converted_bireal():
    torch.manual_seed(0)
    model = BiRealResNet().eval()
    return fxquant.convert(fxquant.prepare(model, fxquant.Recipe.bnn()))


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_converted_bireal_resnet_onnx_is_packed_small_and_matches(dynamo, tmp_path):
    """End to end: the binary layers are ops on packed bits; the .onnx is at most 1.2x the
    fxquant.save file; onnxruntime matches converted(x) (its float stem, batch norms and head
    round in their own order, so up to float rounding)."""
    converted = _converted_bireal()
    code = converted.code
    assert "torch.ops.fxquant.binary_conv2d" in code
    fxquant.save(converted, tmp_path / "m.fxq")
    x = _input(2, 3, 32, 32)
    onnx_model = _export(converted, x, tmp_path / "m.onnx", dynamo)
    bits = {name: b for name, b in converted.named_buffers() if name.endswith("weight_bits")}
    inits = list(_initializers(onnx_model).values())
    assert all((onnx.TensorProto.UINT8, tuple(b.shape)) in inits for b in bits.values())
    largest_float_layer = max(p.numel() for p in converted.parameters())
    assert all(torch.Size(dims).numel() <= largest_float_layer for dtype, dims in inits
               if dtype == onnx.TensorProto.FLOAT)
    assert (tmp_path / "m.onnx").stat().st_size <= 1.2 * (tmp_path / "m.fxq").stat().st_size
    with torch.no_grad():
        expected = converted(x)
    torch.testing.assert_close(_run(tmp_path / "m.onnx", x), expected, rtol=1e-5, atol=1e-5)


def test_converted_bireal_resnet_pt2_loads_equal_and_keeps_the_ops(tmp_path):
    converted = _converted_bireal()
    x = _input(2, 3, 32, 32)
    torch.export.save(torch.export.export(converted, (x,)), tmp_path / "m.pt2")
    loaded = torch.export.load(tmp_path / "m.pt2").module()
    with torch.no_grad():
        assert torch.equal(loaded(x), converted(x))
    state = torch.export.load(tmp_path / "m.pt2").state_dict
    assert not any(v.is_floating_point() and v.dim() == 4 and v.shape[1] > 3
                   for v in state.values())  # no unpacked binary conv weight (stem: 3 inputs)
