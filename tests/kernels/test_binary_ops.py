"""The packed binary ops and their native kernels against hand-written oracles, bit for bit.

The oracles are ``F.conv2d`` / ``F.linear`` on explicit ±1 tensors (sign: +1 where x >= 0,
-1 below, NaN kept) and, for a few tiny cases, a plain Python loop over valid taps; never the
reference module. The native kernels are tested through every instruction set this CPU offers
(the portable one always), so the tests do not depend on the CPU.
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import fxquant.kernels as kernels
from fxquant.kernels import _native
from fxquant.kernels.reference import pack_binary_weight


@pytest.fixture(scope="session")
def native():
    """The built extension (compiled once per session, then cached on disk)."""
    if not _native.available():
        pytest.skip(f"native binary kernels unavailable: {_native.unavailable_reason()}")
    return _native._build()


@pytest.fixture(params=["portable", "popcnt", "avx2", "avx512"])
def isa(request, native, monkeypatch):
    """Each micro-kernel in turn, where this CPU has it."""
    if request.param not in native.isas():
        pytest.skip(f"this CPU has no {request.param}")
    monkeypatch.setenv("FXQUANT_BINARY_ISA", request.param)
    assert native.selected_isa() == request.param
    return request.param


def sign(x):
    """+1 where x >= 0 (-0.0 and +inf included), -1 below, NaN kept."""
    return torch.where(torch.isnan(x), x, torch.where(x >= 0, 1.0, -1.0))


def oracle_conv(x, w, scale, bias, stride, padding, dilation, groups):
    y = F.conv2d(sign(x), w, None, stride, padding, dilation, groups) * scale.view(1, -1, 1, 1)
    return y if bias is None else y + bias.view(1, -1, 1, 1)


def oracle_linear(x, w, scale, bias):
    y = F.linear(sign(x), w) * scale
    return y if bias is None else y + bias


def loop_conv(x, w, stride, padding, dilation):
    """dot over the valid taps only, one output at a time (groups=1)."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    oh = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    ow = (wd + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    out = torch.zeros(n, o, oh, ow)
    for b, co, r, q in itertools.product(range(n), range(o), range(oh), range(ow)):
        dot = 0
        for ci, i, j in itertools.product(range(c), range(kh), range(kw)):
            ih, iw = r * stride - padding + i * dilation, q * stride - padding + j * dilation
            if 0 <= ih < h and 0 <= iw < wd:
                dot += (1 if x[b, ci, ih, iw] >= 0 else -1) * int(w[co, ci, i, j])
        out[b, co, r, q] = dot
    return out


def binary_weight(out, inp, *kernel, generator):
    return torch.where(torch.rand(out, inp, *kernel, generator=generator) < 0.5, 1.0, -1.0)


def with_zeros(x):
    """x with exact zeros, -0.0 and +-inf mixed in (where sign conventions differ)."""
    flat = x.flatten().clone()
    flat[::7] = 0.0
    flat[3::11] = -0.0
    flat[5::13] = math.inf
    flat[6::17] = -math.inf
    return flat.view_as(x)


def exact(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(actual, expected), (actual - expected).abs().max()


GEOMETRIES = [  # stride, padding, dilation
    ((1, 1), (0, 0), (1, 1)), ((1, 1), (1, 1), (1, 1)), ((2, 2), (1, 1), (1, 1)),
    ((2, 1), (2, 0), (1, 1)), ((1, 1), (2, 2), (2, 2)), ((3, 2), (1, 2), (2, 1)),
    ((1, 2), (0, 3), (1, 3)),
]


def hand_packed(w):
    """The stored layout written out: per (out[, kh, kw]) row, byte b holds input channels
    8b .. 8b + 7, channel c at bit c % 8, bit 1 for -1; ceil(in / 8) bytes, padding bits 0."""
    rows = (w.permute(0, 2, 3, 1) if w.dim() == 4 else w).reshape(-1, w.shape[1])
    cin, nbytes = w.shape[1], -(-w.shape[1] // 8)
    out = [[sum(1 << (c - 8 * b) for c in range(8 * b, min(8 * b + 8, cin)) if row[c] < 0)
            for b in range(nbytes)] for row in rows.tolist()]
    shape = (w.shape[0], *w.shape[2:], nbytes)
    return torch.tensor(out, dtype=torch.uint8).reshape(shape)


class TestLayout:
    @pytest.mark.parametrize("channels", [1, 3, 7, 8, 9, 63, 64, 65, 130])
    def test_rows_are_whole_bytes_lsb_first_with_zero_padding(self, channels):
        g = torch.Generator().manual_seed(channels)
        for w in (binary_weight(5, channels, 3, 2, generator=g),
                  binary_weight(5, channels, generator=g)):
            bits, scale = pack_binary_weight(w * 0.25)
            assert bits.dtype == torch.uint8 and bits.is_contiguous()
            assert bits.shape[-1] == math.ceil(channels / 8)
            assert torch.equal(bits, hand_packed(w))
            assert torch.equal(scale, torch.full((5,), 0.25))
            assert torch.equal(kernels.unpack_binary_weight(bits, scale, channels), w * 0.25)

    def test_native_refuses_rows_of_another_length_naming_the_expected_bytes(self, native):
        w = binary_weight(4, 9, 3, 3, generator=torch.Generator().manual_seed(0))
        words = F.pad(pack_binary_weight(w)[0], (0, 6))  # 8 bytes: rows of whole 64-bit words
        with pytest.raises(RuntimeError, match=r"hold 8 bytes, expected 2 \(ceil\(9 input"):
            native.conv2d(torch.randn(1, 9, 4, 4), words, torch.ones(4), None, [1, 1], [1, 1],
                          [1, 1], 1)
        words = F.pad(pack_binary_weight(w[:, :, 0, 0])[0], (0, 6))
        with pytest.raises(RuntimeError, match=r"hold 8 bytes, expected 2 \(ceil\(9 features"):
            native.linear(torch.randn(1, 9), words, torch.ones(4), None)


class TestNativeConv:
    @pytest.mark.parametrize("groups", [1, 2, 3, 6])
    def test_every_geometry_and_group_count_equals_the_pm1_convolution(self, native, isa,
                                                                       groups):
        g = torch.Generator().manual_seed(groups)
        x = with_zeros(torch.randn(2, 6, 7, 9, generator=g))
        for (stride, padding, dilation), k in itertools.product(GEOMETRIES, [(3, 3), (1, 2)]):
            w = binary_weight(6, 6 // groups, *k, generator=g)
            scale, bias = torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g)
            bits, _ = pack_binary_weight(w)
            got = native.conv2d(x, bits, scale, bias, stride, padding, dilation, groups)
            exact(got, oracle_conv(x, w, scale, bias, stride, padding, dilation, groups))

    def test_depthwise_equals_the_pm1_convolution(self, native, isa):
        g = torch.Generator().manual_seed(0)
        x = with_zeros(torch.randn(2, 5, 8, 6, generator=g))
        for (stride, padding, dilation), mult in itertools.product(GEOMETRIES[:4], [1, 2]):
            w = binary_weight(5 * mult, 1, 3, 3, generator=g)
            scale = torch.rand(5 * mult, generator=g)
            bits, _ = pack_binary_weight(w)
            got = native.conv2d(x, bits, scale, None, stride, padding, dilation, 5)
            exact(got, oracle_conv(x, w, scale, None, stride, padding, dilation, 5))

    @pytest.mark.parametrize("channels", [1, 7, 63, 64, 65, 130])
    def test_channel_counts_that_do_not_fill_a_word(self, native, isa, channels):
        g = torch.Generator().manual_seed(channels)
        x = with_zeros(torch.randn(1, channels, 5, 6, generator=g))
        w = binary_weight(37, channels, 3, 3, generator=g)  # 37: a partial panel
        scale, bias = torch.rand(37, generator=g), torch.randn(37, generator=g)
        bits, _ = pack_binary_weight(w)
        got = native.conv2d(x, bits, scale, bias, [1, 1], [1, 1], [1, 1], 1)
        exact(got, oracle_conv(x, w, scale, bias, [1, 1], [1, 1], [1, 1], 1))

    @pytest.mark.parametrize("size", [(4, 5), (17, 15)])  # one block of pixels, many blocks
    def test_groups_of_odd_channel_counts_in_one_and_many_pixel_blocks(self, native, isa, size):
        g = torch.Generator().manual_seed(size[0])
        x = with_zeros(torch.randn(2, 70, *size, generator=g))
        w = binary_weight(74, 35, 3, 3, generator=g)  # 35 channels a group: rows of 5 bytes
        scale, bias = torch.rand(74, generator=g), torch.randn(74, generator=g)
        bits, _ = pack_binary_weight(w)
        got = native.conv2d(x, bits, scale, bias, [1, 1], [1, 1], [1, 1], 2)
        exact(got, oracle_conv(x, w, scale, bias, [1, 1], [1, 1], [1, 1], 2))

    def test_many_blocks_and_panels_across_images_and_threads(self, native, isa):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(3, 70, 13, 11, generator=g)
        w = binary_weight(70, 70, 3, 3, generator=g)
        scale, bias = torch.rand(70, generator=g), torch.randn(70, generator=g)
        bits, _ = pack_binary_weight(w)
        expected = oracle_conv(x, w, scale, bias, [1, 1], [1, 1], [1, 1], 1)
        before = torch.get_num_threads()
        try:
            for threads in (1, 2):
                torch.set_num_threads(threads)
                exact(native.conv2d(x, bits, scale, bias, [1, 1], [1, 1], [1, 1], 1), expected)
        finally:
            torch.set_num_threads(before)

    def test_channels_last_and_strided_inputs(self, native, isa):
        g = torch.Generator().manual_seed(2)
        x = with_zeros(torch.randn(2, 70, 6, 10, generator=g))
        w = binary_weight(8, 70, 3, 3, generator=g)
        scale = torch.ones(8)
        bits, _ = pack_binary_weight(w)
        expected = oracle_conv(x, w, scale, None, [1, 1], [1, 1], [1, 1], 1)
        for view in (x.to(memory_format=torch.channels_last), x.transpose(2, 3).transpose(2, 3),
                     torch.stack([x, -x], dim=-1)[..., 0]):
            exact(native.conv2d(view, bits, scale, None, [1, 1], [1, 1], [1, 1], 1), expected)

    @pytest.mark.parametrize(("stride", "padding", "dilation"), [(1, 1, 1), (2, 2, 1), (1, 2, 2)])
    def test_equals_a_loop_over_the_valid_taps(self, native, isa, stride, padding, dilation):
        g = torch.Generator().manual_seed(3)
        x = with_zeros(torch.randn(1, 3, 4, 5, generator=g))
        w = binary_weight(2, 3, 3, 3, generator=g)
        bits, _ = pack_binary_weight(w)
        got = native.conv2d(x, bits, torch.ones(2), None, [stride] * 2, [padding] * 2,
                            [dilation] * 2, 1)
        exact(got, loop_conv(x, w, stride, padding, dilation))

    def test_an_output_entirely_in_the_padding_is_the_bias(self, native, isa):
        w = binary_weight(4, 3, 3, 3, generator=torch.Generator().manual_seed(4))
        bits, _ = pack_binary_weight(w)
        bias = torch.tensor([1.0, -2.0, 0.5, 3.0])
        got = native.conv2d(torch.randn(1, 3, 2, 2), bits, torch.ones(4), bias, [1, 1], [4, 4],
                            [1, 1], 1)
        assert torch.equal(got[..., 0, 0], bias.view(1, 4))

    def test_nan_in_the_input_is_not_handled(self, native):
        bits, _ = pack_binary_weight(torch.ones(4, 3, 3, 3))
        x = torch.randn(1, 3, 5, 5)
        x[0, 1, 2, 3] = math.nan
        assert native.conv2d(x, bits, torch.ones(4), None, [1, 1], [1, 1], [1, 1], 1) is None


class TestNativeLinear:
    @pytest.mark.parametrize("features", [1, 7, 63, 64, 65, 130])
    def test_feature_counts_that_do_not_fill_a_word(self, native, isa, features):
        g = torch.Generator().manual_seed(features)
        w = binary_weight(37, features, generator=g)
        scale, bias = torch.rand(37, generator=g), torch.randn(37, generator=g)
        bits, _ = pack_binary_weight(w)
        for shape in ((1, features), (9, features), (2, 3, features), (features,)):
            x = with_zeros(torch.randn(*shape, generator=g))
            exact(native.linear(x, bits, scale, bias), oracle_linear(x, w, scale, bias))

    def test_a_large_gemm_and_gemv(self, native, isa):
        g = torch.Generator().manual_seed(5)
        w = binary_weight(300, 1000, generator=g)
        scale = torch.rand(300, generator=g)
        bits, _ = pack_binary_weight(w)
        for rows in (1, 200):
            x = torch.randn(rows, 1000, generator=g)
            exact(native.linear(x, bits, scale, None), oracle_linear(x, w, scale, None))

    def test_nan_in_the_input_is_not_handled(self, native):
        bits, _ = pack_binary_weight(torch.ones(4, 3))
        assert native.linear(torch.tensor([[1.0, math.nan, 2.0]]), bits, torch.ones(4),
                             None) is None

    def test_unknown_isa_is_refused_naming_the_choices(self, native, monkeypatch):
        monkeypatch.setenv("FXQUANT_BINARY_ISA", "sse9")
        bits, _ = pack_binary_weight(torch.ones(4, 3))
        with pytest.raises(RuntimeError, match="FXQUANT_BINARY_ISA=sse9.*portable"):
            native.linear(torch.ones(1, 3), bits, torch.ones(4), None)


class TestOps:
    """torch.ops.fxquant.* (native where it can, reference otherwise) against the oracles."""

    def test_conv_op_equals_the_oracle_with_scale_and_bias(self, native):
        g = torch.Generator().manual_seed(6)
        x = with_zeros(torch.randn(2, 20, 9, 9, generator=g))
        w = binary_weight(16, 10, 3, 3, generator=g)
        scale, bias = torch.rand(16, generator=g), torch.randn(16, generator=g)
        bits, _ = pack_binary_weight(w)
        got = torch.ops.fxquant.binary_conv2d(x, bits, scale, bias, [2, 1], [1, 0], [1, 2], 2)
        exact(got, oracle_conv(x, w, scale, bias, [2, 1], [1, 0], [1, 2], 2))

    def test_depthwise_op_equals_the_oracle(self, native):
        g = torch.Generator().manual_seed(7)
        x = with_zeros(torch.randn(1, 8, 6, 6, generator=g))
        w = binary_weight(8, 1, 3, 3, generator=g)
        bits, _ = pack_binary_weight(w)
        got = kernels.binary_conv2d(x, bits, torch.ones(8), None, [1, 1], [1, 1], [1, 1], 8)
        exact(got, oracle_conv(x, w, torch.ones(8), None, [1, 1], [1, 1], [1, 1], 8))

    def test_native_equals_the_reference_module(self, native):
        from fxquant.kernels import reference

        g = torch.Generator().manual_seed(8)
        x = torch.randn(2, 96, 12, 12, generator=g)
        bits, scale = pack_binary_weight(torch.randn(64, 96, 3, 3, generator=g).sign())
        args = (bits, scale, None, [1, 1], [1, 1], [1, 1], 1)
        exact(native.conv2d(x, *args), reference.binary_conv2d(x, *args))
        x = torch.randn(5, 200, generator=g)
        bits, scale = pack_binary_weight(torch.randn(50, 200, generator=g).sign())
        exact(native.linear(x, bits, scale, None), reference.binary_linear(x, bits, scale, None))

    def test_nan_falls_back_and_propagates(self, native):
        bits, _ = pack_binary_weight(torch.tensor([[1.0, -1.0], [-1.0, -1.0], [1.0, 1.0],
                                                   [-1.0, 1.0]]))
        x = torch.tensor([[math.nan, 1.0], [2.0, -3.0]])
        got = torch.ops.fxquant.binary_linear(x, bits, torch.ones(4), None)
        assert torch.isnan(got[0]).all()
        assert torch.equal(got[1], torch.tensor([2.0, 0.0, 0.0, -2.0]))  # sign(x) = [1, -1]

    def test_float64_input_uses_the_reference(self, native):
        w = torch.tensor([[1.0, -1.0, 1.0]] * 4)
        bits, _ = pack_binary_weight(w)
        x = torch.tensor([[0.5, -2.0, 0.0]], dtype=torch.float64)
        got = torch.ops.fxquant.binary_linear(x, bits, torch.ones(4), None)
        assert got.dtype == torch.float64 and torch.equal(got, torch.full((1, 4), 3.0,
                                                                          dtype=torch.float64))


class TestFallback:
    @pytest.fixture
    def fresh(self, monkeypatch):
        """A process where the warning has not fired yet."""
        monkeypatch.setattr(_native, "_warned", False)

    def test_no_kernels_runs_the_reference_and_warns_once(self, fresh, monkeypatch):
        monkeypatch.setenv("FXQUANT_NO_KERNELS", "1")
        assert not kernels.native_available()
        g = torch.Generator().manual_seed(9)
        w = binary_weight(6, 4, 3, 3, generator=g)
        bits, _ = pack_binary_weight(w)
        x = with_zeros(torch.randn(1, 4, 5, 5, generator=g))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                got = torch.ops.fxquant.binary_conv2d(x, bits, torch.ones(6), None, [1, 1],
                                                      [1, 1], [1, 1], 1)
                exact(got, oracle_conv(x, w, torch.ones(6), None, [1, 1], [1, 1], [1, 1], 1))
        mine = [w for w in caught if issubclass(w.category, kernels.NativeKernelWarning)]
        assert len(mine) == 1
        assert "FXQUANT_NO_KERNELS" in str(mine[0].message)
        assert mine[0].filename == __file__  # points at the caller's line

    def test_a_failed_build_names_the_reason_and_the_fix(self, fresh, monkeypatch):
        monkeypatch.delenv("FXQUANT_NO_KERNELS", raising=False)
        monkeypatch.setattr(_native, "_module", None)
        monkeypatch.setattr(_native, "_build_error", "RuntimeError: Ninja is required")
        bits, _ = pack_binary_weight(torch.ones(4, 3))
        reason = "Ninja is required.*fxquant\\[fast\\]"
        with pytest.warns(kernels.NativeKernelWarning, match=reason):
            got = kernels.binary_linear(torch.ones(2, 3), bits, torch.ones(4), None)
        assert torch.equal(got, torch.full((2, 4), 3.0))
        assert _native.isa() is None


def test_ninja_from_the_wheel_or_the_venv_is_put_on_path_when_missing(monkeypatch):
    import os
    import sys

    monkeypatch.setattr(_native.shutil, "which", lambda name: None)
    monkeypatch.setenv("PATH", "/nowhere")
    with _native._ninja_on_path():
        assert os.path.dirname(sys.executable) in os.environ["PATH"].split(os.pathsep)
    assert os.environ["PATH"] == "/nowhere"


class TestCompileAndExport:
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(10)
            self.w = binary_weight(8, 6, 3, 3, generator=g)
            bits, scale = pack_binary_weight(self.w)
            self.register_buffer("bits", bits)
            self.register_buffer("scale", scale)

        def forward(self, x):
            y = torch.ops.fxquant.binary_conv2d(x, self.bits, self.scale, None, [1, 1], [1, 1],
                                                [1, 1], 1)
            return torch.relu(y) + 1

    def expected(self, net, x):
        return torch.relu(oracle_conv(x, net.w, net.scale, None, [1, 1], [1, 1], [1, 1], 1)) + 1

    def test_torch_compile_fullgraph(self, native):
        net = self.Net()
        x = torch.randn(2, 6, 7, 7)
        compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
        exact(compiled(x), self.expected(net, x))

    def test_torch_export_keeps_the_op(self, native):
        net = self.Net()
        x = torch.randn(2, 6, 7, 7)
        program = torch.export.export(net, (x,))
        targets = {node.target for node in program.graph.nodes}
        assert torch.ops.fxquant.binary_conv2d.default in targets
        exact(program.module()(x), self.expected(net, x))
