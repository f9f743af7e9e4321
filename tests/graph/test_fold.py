"""convert's batch-norm folding: which batch norms fold, and how exactly.

Oracles: ``prepared.eval()`` (which runs eval-mode batch norm itself) where convert must match it
bit for bit, and the batch norm written out in float64 where a folded float layer must stay
within the bound documented in ``fold_batch_norm``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant.graph.meta import get_record
from fxquant.graph.patterns import is_batch_norm, is_plain_batch_norm

U = 2.0**-24  # float32 unit roundoff

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class BNAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d in short: batch norm, then an activation, in one module."""

    def forward(self, x):
        return F.relu(super().forward(x))


class CheckedBN(nn.BatchNorm2d):
    """A subclass that only changes the input check: its call is still batch norm."""

    def _check_input_dim(self, input):
        if input.dim() != 4:
            raise ValueError("4D input expected")


class LayerBN(nn.Module):
    """``bn(layer(x))`` then a layer that reads the result, for 0 to 3 spatial dims."""

    def __init__(self, dims: int = 2, bias: bool = True, bn: nn.Module | None = None,
                 cin: int = 3, cout: int = 12) -> None:
        super().__init__()
        self.dims = dims
        if dims == 0:
            self.layer = nn.Linear(cin, cout, bias=bias)
        else:
            self.layer = CONV[dims](cin, cout, 3, padding=1, bias=bias)
        self.bn = bn if bn is not None else BN[max(dims, 1)](cout)
        self.head = nn.Linear(cout, 4)

    def forward(self, x):
        y = self.bn(self.layer(x))
        return self.head(y if self.dims == 0 else y.mean(tuple(range(2, 2 + self.dims)))), y


def _extreme_statistics(model: nn.Module, seed: int = 0) -> None:
    """Trained-looking batch norms at their worst: zero and tiny variances (``|s|`` up to 300
    and more), means up to 1e3 and a layer bias close to them (so ``(b − μ)·s`` cancels)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, nn.modules.batchnorm._BatchNorm):
                continue
            n = m.num_features
            if m.running_mean is not None:
                m.running_mean.copy_(torch.randn(n, generator=g) * 10.0 ** torch.randint(
                    -1, 4, (n,), generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) * 1e-6)
                m.running_var[::3] = 0
            if m.weight is not None:
                m.weight.copy_(torch.randn(n, generator=g) * 2)
                m.bias.copy_(torch.randn(n, generator=g))
        layer = getattr(model, "layer", None)
        bn = getattr(model, "bn", None)
        if layer is not None and layer.bias is not None and getattr(bn, "running_mean", None) \
                is not None:
            layer.bias.copy_(bn.running_mean + torch.randn(bn.num_features, generator=g) * 1e-2)


def _input(dims: int, channels_last: bool = False, cin: int = 3) -> torch.Tensor:
    x = torch.randn((5, cin) + (6,) * dims, generator=torch.Generator().manual_seed(1))
    return x.to(memory_format=torch.channels_last) if channels_last else x


def _convert(model: nn.Module, quantized: bool, **kwargs):
    recipe = fxquant.Recipe(weight="ste_sign")
    if not quantized:
        recipe = recipe.for_name("layer", weight=None)
    prepared = fxquant.prepare(model, recipe, **kwargs).eval()
    converted = fxquant.convert(prepared)
    converted.graph.lint()
    return prepared, converted


def _batch_norm_modules(gm: nn.Module) -> list[nn.Module]:
    return [m for m in gm.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _float64_reference(model: LayerBN, x: torch.Tensor):
    """The exact batch norm of the exact layer output, and the error unit
    ``u·(|s|·Σ|W||x| + |b'|)`` of the documented bound, both in float64."""
    layer, bn = model.layer, model.bn
    d = torch.float64
    x64 = x.to(d)
    w64 = layer.weight.to(d)
    b64 = layer.bias.to(d) if layer.bias is not None else None
    if model.dims == 0:
        y, absy = F.linear(x64, w64, b64), F.linear(x64.abs(), w64.abs())
    else:
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[model.dims]
        y, absy = conv(x64, w64, b64, padding=1), conv(x64.abs(), w64.abs(), padding=1)
    view = (-1,) + (1,) * model.dims
    s = 1 / torch.sqrt(bn.running_var.to(d) + bn.eps)
    beta = torch.zeros_like(s)
    if bn.weight is not None:
        s, beta = s * bn.weight.to(d), bn.bias.to(d)
    mu = bn.running_mean.to(d)
    exact = (y - mu.reshape(view)) * s.reshape(view) + beta.reshape(view)
    bprime = ((b64 if b64 is not None else 0) - mu) * s + beta
    unit = U * (s.abs().reshape(view) * absy + bprime.abs().reshape(view))
    return exact, unit


class TestAfterQuantizedLayer:
    """A quantized layer keeps its weights; its batch norm becomes the fixed eval op."""

    @pytest.mark.parametrize("dims, channels_last", [(0, False), (1, False), (2, False),
                                                     (2, True), (3, False)])
    def test_equals_eval_batch_norm_bit_for_bit_with_near_zero_variances(self, dims,
                                                                          channels_last):
        model = LayerBN(dims)
        _extreme_statistics(model)
        prepared, converted = _convert(model, quantized=True)
        x = _input(dims, channels_last)
        with torch.no_grad():
            (out, y), (ref, y_ref) = converted(x), prepared(x)
        assert torch.equal(y, y_ref) and torch.equal(out, ref)
        assert not _batch_norm_modules(converted)

    def test_is_close_to_batch_norm_written_out_in_float64(self):
        model = LayerBN(2)
        _extreme_statistics(model)
        prepared, converted = _convert(model, quantized=True)
        x = _input(2)
        with torch.no_grad():
            _, out = converted(x)
        bn, d = model.bn, torch.float64
        w, b, x = torch.sign(model.layer.weight).to(d), model.layer.bias.to(d), x.to(d)
        y = F.conv2d(x, w, b, padding=1)  # the binary layer, exactly
        absy = F.conv2d(x.abs(), w.abs(), b.abs(), padding=1)
        s = (bn.weight.to(d) / torch.sqrt(bn.running_var.to(d) + bn.eps))[:, None, None]
        mu, beta = bn.running_mean.to(d)[:, None, None], bn.bias.to(d)[:, None, None]
        exact = (y - mu) * s + beta
        # rounding of the float32 conv (fan-in 27 + bias), amplified by s, then of eval batch
        # norm itself: alpha = w/sqrt(var + eps), beta - mu*alpha, y*alpha + beta'
        bound = 29 * U * s.abs() * absy + 4 * U * (
            (y * s).abs() + (mu * s).abs() + beta.abs() + exact.abs())
        assert ((out.to(d) - exact).abs() <= bound).all()

    def test_converted_model_stays_in_eval_mode_and_keeps_state_dict_keys(self):
        model = LayerBN(2)
        _extreme_statistics(model)
        prepared, converted = _convert(model, quantized=True)
        x = _input(2)
        with torch.no_grad():
            ref = prepared(x)[1]
            assert torch.equal(converted.train()(x)[1], ref)  # statistics are not batch stats
        keys = converted.state_dict().keys()
        assert {"bn.running_mean", "bn.running_var", "bn.weight", "bn.bias"} <= keys
        assert torch.equal(converted.state_dict()["bn.running_mean"], model.bn.running_mean)

    def test_affine_false(self):
        model = LayerBN(2, bn=nn.BatchNorm2d(12, affine=False))
        _extreme_statistics(model)
        prepared, converted = _convert(model, quantized=True)
        x = _input(2)
        with torch.no_grad():
            assert torch.equal(converted(x)[1], prepared(x)[1])
        assert not _batch_norm_modules(converted)


class TestIntoFloatLayer:
    """A float Linear/Conv absorbs the batch norm into its weight and bias."""

    @pytest.mark.parametrize("dims", [2, 3])
    @pytest.mark.parametrize("bias", [True, False])
    @pytest.mark.parametrize("affine", [True, False])
    def test_within_the_documented_bound_of_exact_batch_norm(self, dims, bias, affine):
        model = LayerBN(dims, bias=bias, bn=BN[dims](12, affine=affine))
        _extreme_statistics(model)
        prepared, converted = _convert(model, quantized=False)
        assert not _batch_norm_modules(converted)
        assert not torch.equal(converted.layer.weight, model.layer.weight)  # absorbed
        x = _input(dims)
        with torch.no_grad():
            _, out = converted(x)
        exact, unit = _float64_reference(model, x)
        fan_in = model.layer.weight[0].numel() + 1
        assert ((out.to(torch.float64) - exact).abs() <= (fan_in + 2) * unit).all()

    @pytest.mark.parametrize("dims", [0, 1])
    @pytest.mark.parametrize("shapes", [False, True])
    def test_batch_norm_1d_after_linear_or_conv1d_stays_exact_eval_batch_norm(self, dims,
                                                                               shapes):
        """Whether BatchNorm1d normalises the layer's outputs depends on the input's rank; the
        result must not depend on whether prepare recorded shapes (fxquant.load records none)."""
        model = LayerBN(dims)
        _extreme_statistics(model)
        x = _input(dims)
        prepared, converted = _convert(model, quantized=False,
                                       example_inputs=(x,) if shapes else None)
        with torch.no_grad():
            assert torch.equal(converted(x)[1], prepared(x)[1])
        assert torch.equal(converted.layer.weight, model.layer.weight)
        assert not _batch_norm_modules(converted)

    def test_batch_norm_1d_over_a_linear_on_sequences_normalises_positions(self):
        class Sequence(nn.Module):  # (N, L, C) with L == C: BatchNorm1d normalises dim 1 = L
            def __init__(self):
                super().__init__()
                self.layer, self.bn = nn.Linear(6, 6), nn.BatchNorm1d(6)

            def forward(self, x):
                return self.bn(self.layer(x))

        model = Sequence()
        with torch.no_grad():  # far from identity, so normalising the wrong dim shows
            model.bn.running_mean.uniform_(-1, 1)
            model.bn.running_var.uniform_(0.25, 2)
            model.bn.weight.uniform_(0.5, 2)
        x = torch.randn(4, 6, 6)
        prepared, converted = _convert(model, quantized=False, example_inputs=(x,))
        with torch.no_grad():
            out = converted(x)
            assert torch.equal(out, prepared(x))
            # hand-written oracle: batch norm over dim 1 of the layer's (N, L, C) output
            bn = model.bn
            s = (bn.weight / torch.sqrt(bn.running_var + bn.eps))[:, None]
            expected = (model.layer(x) - bn.running_mean[:, None]) * s + bn.bias[:, None]
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    def test_channels_last_input(self):
        model = LayerBN(2)
        _extreme_statistics(model)
        prepared, converted = _convert(model, quantized=False)
        x = _input(2, channels_last=True)
        with torch.no_grad():
            _, out = converted(x)
        exact, unit = _float64_reference(model, x)
        assert ((out.to(torch.float64) - exact).abs() <= 30 * unit).all()

    def test_weight_tied_to_another_module_is_left_unscaled_there(self):
        class Tied(nn.Module):
            def __init__(self):
                super().__init__()
                self.layer, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
                self.other = nn.Conv2d(3, 3, 3, padding=1)
                self.other.weight = self.layer.weight

            def forward(self, x):
                return self.bn(self.layer(x)) + self.other(x)

        model = Tied()
        with torch.no_grad():
            model.bn.running_var.fill_(0.25)  # s ≈ 2: a scaled weight in `other` would show
            model.bn.running_mean.fill_(0.5)
        recipe = fxquant.Recipe(weight="ste_sign").for_regex("layer|other", weight=None)
        converted = fxquant.convert(fxquant.prepare(model, recipe).eval())
        assert not _batch_norm_modules(converted)
        x = _input(2)
        with torch.no_grad():
            s = 1 / torch.sqrt(torch.tensor(0.25 + model.bn.eps))
            expected = (F.conv2d(x, model.layer.weight, model.layer.bias, padding=1) - 0.5) * s
            expected = expected + F.conv2d(x, model.layer.weight, model.other.bias, padding=1)
            torch.testing.assert_close(converted(x), expected, rtol=1e-5, atol=1e-5)
            assert torch.equal(converted.other.weight, model.layer.weight)

    def test_layer_whose_weight_values_are_read_elsewhere_keeps_its_weight(self):
        class Reads(nn.Module):
            def __init__(self):
                super().__init__()
                self.layer, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

            def forward(self, x):
                return self.bn(self.layer(x)) * self.layer.weight.abs().sum()

        model = Reads()
        with torch.no_grad():
            model.bn.running_var.fill_(0.25)
        prepared, converted = _convert(model, quantized=False)
        x = _input(2)
        with torch.no_grad():
            assert torch.equal(converted(x), prepared(x))
        assert torch.equal(converted.layer.weight, model.layer.weight)

    def test_layer_whose_weight_dtype_is_read_elsewhere_still_folds(self):
        class ReadsDtype(nn.Module):
            def __init__(self):
                super().__init__()
                self.layer, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

            def forward(self, x):
                return self.bn(self.layer(x.to(self.layer.weight.dtype)))

        model = ReadsDtype()
        with torch.no_grad():
            model.bn.running_var.fill_(0.25)
        prepared, converted = _convert(model, quantized=False)
        assert not _batch_norm_modules(converted)
        x = _input(2).double()
        with torch.no_grad():
            out = converted(x)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, prepared(x), rtol=1e-5, atol=1e-5)


class TestWhichBatchNormsFold:
    def test_subclass_whose_forward_adds_an_activation_is_kept(self):
        """repro r3: timm's BatchNormAct2d as a leaf must not be folded as plain batch norm."""
        for quantized in (True, False):
            model = LayerBN(2, bn=BNAct(12))
            _extreme_statistics(model)
            prepared, converted = _convert(model, quantized, leaf_modules=[BNAct])
            x = _input(2)
            with torch.no_grad():
                out = converted(x)[1]
                assert torch.equal(out, prepared(x)[1]) and bool((out >= 0).all())
            assert any(isinstance(m, BNAct) for m in converted.modules())

    @pytest.mark.parametrize("quantized", [True, False])
    def test_subclass_that_only_checks_its_input_folds(self, quantized):
        model = LayerBN(2, bn=CheckedBN(12))
        _extreme_statistics(model)
        prepared, converted = _convert(model, quantized, leaf_modules=[CheckedBN])
        assert not _batch_norm_modules(converted)
        x = _input(2)
        with torch.no_grad():
            out, ref = converted(x)[1], prepared(x)[1]
        assert torch.equal(out, ref)
        if not quantized:  # its own input check is not BatchNorm2d's: not absorbed
            assert torch.equal(converted.layer.weight, model.layer.weight)

    @pytest.mark.parametrize("quantized", [True, False])
    def test_sync_batch_norm_in_eval_folds(self, quantized):
        model = LayerBN(2, bn=nn.SyncBatchNorm(12))
        _extreme_statistics(model)
        prepared, converted = _convert(model, quantized)
        assert not _batch_norm_modules(converted)
        x = _input(2)
        with torch.no_grad():
            out, ref = converted(x)[1], prepared(x)[1]
        assert torch.equal(out, ref)
        if not quantized:  # it takes any rank >= 2: not absorbed into the weight
            assert torch.equal(converted.layer.weight, model.layer.weight)

    def test_batch_norm_with_a_forward_hook_is_kept(self):
        model = LayerBN(2)
        model.bn.register_forward_hook(lambda module, args, out: out * 3)
        prepared, converted = _convert(model, quantized=False)
        x = _input(2)
        with torch.no_grad():
            assert torch.equal(converted(x)[1], prepared(x)[1])
        assert converted.layer.weight.equal(model.layer.weight)

    @pytest.mark.parametrize("quantized", [True, False])
    def test_batch_norm_without_running_statistics_uses_batch_statistics(self, quantized):
        model = LayerBN(2, bn=nn.BatchNorm2d(12, track_running_stats=False))
        prepared, converted = _convert(model, quantized)
        x = _input(2)
        with torch.no_grad():
            out = converted(x)[1]
            assert torch.equal(out, prepared(x)[1])
        # batch statistics: every channel of the output has mean 0 over the batch
        torch.testing.assert_close(out.mean((0, 2, 3)), torch.zeros(12), rtol=0, atol=1e-4)
        assert len(_batch_norm_modules(converted)) == 1

    @pytest.mark.parametrize("quantized", [True, False])
    def test_batch_norm_after_a_layer_used_elsewhere_too_is_kept(self, quantized):
        class Branch(nn.Module):
            def __init__(self):
                super().__init__()
                self.layer, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

            def forward(self, x):
                y = self.layer(x)
                return self.bn(y) + y

        model = Branch()
        _extreme_statistics(model)
        prepared, converted = _convert(model, quantized)
        x = _input(2)
        with torch.no_grad():
            assert torch.equal(converted(x), prepared(x))
        assert len(_batch_norm_modules(converted)) == 1


def _absorbed(gm: torch.fx.GraphModule) -> dict[str, int]:
    return {r.layer: r.absorbed for n in gm.graph.nodes
            if (r := get_record(n)) is not None and r.role == "layer"}


def _param_count(gm: nn.Module) -> int:
    """The converted model's own parameters, packed/folded weights as their numbers of values,
    plus what each layer recorded as absorbed: what the prepared model had."""
    return sum(p.numel() for p in gm.parameters()) + sum(_absorbed(gm).values())


class TestAbsorbedParameters:
    """A float layer that absorbs a batch norm records the prepared parameters that left."""

    @pytest.mark.parametrize("bias", [True, False])
    @pytest.mark.parametrize("affine", [True, False])
    def test_batch_norm_weight_and_bias_less_the_bias_the_layer_gained(self, bias, affine):
        model = LayerBN(2, bias=bias, bn=nn.BatchNorm2d(12, affine=affine)).eval()
        prepared = fxquant.prepare(model, fxquant.Recipe()).eval()  # every layer float
        converted = fxquant.convert(prepared)
        converted.graph.lint()
        assert not _batch_norm_modules(converted)
        expected = (2 * 12 if affine else 0) - (0 if bias else 12)  # hand count
        assert _absorbed(converted) == {"layer": expected, "head": 0}
        assert _absorbed(prepared) == {"layer": 0, "head": 0}
        # nothing is quantized: every tensor stays a parameter, so torch's count is the oracle
        assert _param_count(converted) == sum(p.numel() for p in model.parameters())

    def test_batch_norm_after_a_quantized_layer_absorbs_nothing(self):
        _, converted = _convert(LayerBN(2), quantized=True)
        assert _absorbed(converted) == {"layer": 0, "head": 0}
        assert {"bn.weight", "bn.bias"} <= set(converted.state_dict())  # F.batch_norm's

    def test_a_batch_norm_called_after_two_float_convs_counts_once(self):
        class Shared(nn.Module):
            def __init__(self):
                super().__init__()
                self.a, self.b = nn.Conv2d(3, 4, 3, bias=False), nn.Conv2d(3, 4, 3, bias=False)
                self.bn = nn.BatchNorm2d(4)

            def forward(self, x):
                return self.bn(self.a(x)) + self.bn(self.b(x))

        model = Shared().eval()
        converted = fxquant.convert(fxquant.prepare(model, fxquant.Recipe()).eval())
        converted.graph.lint()
        assert not _batch_norm_modules(converted)
        assert sorted(_absorbed(converted).values()) == [-4, 2 * 4 - 4]
        assert _param_count(converted) == sum(p.numel() for p in model.parameters())

    def test_a_batch_norm_that_also_stays_a_call_counts_nothing(self):
        class Mixed(nn.Module):  # the same batch norm after a float conv and after an add
            def __init__(self):
                super().__init__()
                self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

            def forward(self, x):
                return self.bn(self.conv(x)) + self.bn(x + 1)

        model = Mixed().eval()
        converted = fxquant.convert(fxquant.prepare(model, fxquant.Recipe()).eval())
        converted.graph.lint()
        assert _absorbed(converted) == {"conv": -4}  # only the bias it gained
        assert _param_count(converted) == sum(p.numel() for p in model.parameters())


class TestPatterns:
    @pytest.mark.parametrize("module, plain", [
        (nn.BatchNorm1d(4), True), (nn.BatchNorm2d(4), True), (nn.BatchNorm3d(4), True),
        (nn.SyncBatchNorm(4), True), (CheckedBN(4), True),
        (nn.LazyBatchNorm2d(), False),  # a forward pre-hook until its first call
        (nn.BatchNorm2d(4, affine=False, track_running_stats=False), True),
        (BNAct(4), False), (nn.InstanceNorm2d(4), False), (nn.LayerNorm(4), False),
        (nn.Conv2d(1, 1, 1), False), (None, False),
    ])
    def test_plain_batch_norm(self, module, plain):
        assert is_plain_batch_norm(module) is plain

    def test_a_hook_makes_a_batch_norm_not_plain(self):
        bn = nn.BatchNorm2d(4)
        bn.register_forward_pre_hook(lambda module, args: None)
        assert not is_plain_batch_norm(bn)

    @pytest.mark.parametrize("bn, expected", [
        (nn.BatchNorm2d(4), True), (nn.SyncBatchNorm(4), True), (CheckedBN(4), True),
        (BNAct(4), False)])
    def test_batch_norm_nodes_for_the_recipes(self, bn, expected):
        graph = torch.fx.Graph()
        node = graph.call_module("bn", (graph.placeholder("x"),))
        assert is_batch_norm(node, {"bn": bn}) is expected
