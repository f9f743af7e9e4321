"""prepare(): every prepared model is compared with a hand-written reference applying the same
quantizers by hand; graphs are linted; gradients, state_dict keys and determinism are checked."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant.graph.tracer import trace
from fxquant.quantizers import approx_sign, magnitude_aware_sign, ste_sign, ste_tern
from tests.models import MLP, BasicBlock, ResNet, SmallCNN, Twice, resnet18

torch.manual_seed(0)


def _same_params(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _check(prepared: torch.fx.GraphModule, reference, x: torch.Tensor) -> None:
    prepared.graph.lint()
    torch.testing.assert_close(prepared(x), reference(x), rtol=0, atol=0)


class TestMLP:
    def test_bnn_matches_hand_written_reference(self):
        model = MLP()
        prepared = fxquant.prepare(model, fxquant.Recipe.bnn())

        def reference(x):  # first (fc1) and last (fc3) layer stay float
            h = torch.relu(model.fc1(x.flatten(1)))
            h = torch.relu(F.linear(ste_sign(h), ste_sign(model.fc2.weight), model.fc2.bias))
            return model.fc3(h)

        _check(prepared, reference, torch.randn(5, 64))

    def test_code_calls_quantizer_submodules(self):
        prepared = fxquant.prepare(MLP(), fxquant.Recipe.bnn())
        assert "self.fc2_weight_quantizer(fc2_weight)" in prepared.code
        assert "self.fc2_input_quantizer(" in prepared.code
        assert "fc1_weight_quantizer" not in prepared.code

    def test_gradients_reach_latent_weights(self):
        # weights only: binary activations without BN saturate the STE windows of an MLP
        prepared = fxquant.prepare(MLP(), fxquant.Recipe(weight="ste_sign"))
        prepared(torch.randn(8, 64)).square().sum().backward()
        for name in ("fc1", "fc2", "fc3"):
            grad = prepared.get_submodule(name).weight.grad
            assert grad is not None and grad.abs().sum() > 0, name

    def test_state_dict_keys_are_the_float_models_and_load_strictly(self):
        model = MLP()
        prepared = fxquant.prepare(model, fxquant.Recipe.bnn())
        assert list(prepared.state_dict()) == list(model.state_dict())
        other = MLP()
        prepared.load_state_dict(other.state_dict(), strict=True)
        assert torch.equal(prepared.fc2.weight, other.fc2.weight)

    def test_input_model_is_untouched(self):
        model = MLP()
        before = copy.deepcopy(model)
        prepared = fxquant.prepare(model, fxquant.Recipe.bnn())
        prepared(torch.randn(4, 64)).sum().backward()
        with torch.no_grad():
            prepared.fc2.weight.add_(1.0)
        assert _same_params(model, before)
        assert all(p.grad is None for p in model.parameters())
        assert [n for n, _ in model.named_modules()] == [n for n, _ in before.named_modules()]

    def test_same_model_and_recipe_give_identical_code_and_keys(self):
        model = MLP()
        a = fxquant.prepare(model, fxquant.Recipe.bnn())
        b = fxquant.prepare(model, fxquant.Recipe.bnn())
        assert a.code == b.code
        assert list(a.state_dict()) == list(b.state_dict())


class TestCNNWithBatchNorm:
    def test_all_layers_weight_input_output(self):
        model = SmallCNN().eval()
        recipe = fxquant.Recipe(weight="ste_sign", input="approx_sign", output="ste_tern")
        prepared = fxquant.prepare(model, recipe).eval()

        def reference(x):
            m = model
            h = F.conv2d(approx_sign(x), ste_sign(m.conv1.weight), m.conv1.bias, 1, 1)
            h = ste_tern(F.relu(m.bn1(h)))  # output quantizer after conv -> bn -> relu
            h = F.conv2d(approx_sign(h), ste_sign(m.conv2.weight), None, 1, 1)
            h = m.pool(ste_tern(F.hardtanh(m.bn2(h))))
            h = F.linear(approx_sign(h.flatten(1)), ste_sign(m.fc.weight), m.fc.bias)
            return ste_tern(h)

        _check(prepared, reference, torch.randn(3, 1, 8, 8))

    def test_train_mode_updates_batch_norm_like_float_model(self):
        model = SmallCNN().train()
        prepared = fxquant.prepare(model, fxquant.Recipe(weight="ste_sign"))
        prepared(torch.randn(4, 1, 8, 8))
        assert prepared.bn1.num_batches_tracked.item() == 1
        assert model.bn1.num_batches_tracked.item() == 0


class TestResidual:
    def test_output_quantizer_never_skips_a_residual_branch(self):
        block = BasicBlock(4, 4).eval()
        prepared = fxquant.prepare(block, fxquant.Recipe(output="ste_sign")).eval()

        def reference(x):
            b = block
            out = ste_sign(b.relu(b.bn1(b.conv1(x))))
            out = ste_sign(b.bn2(b.conv2(out)))  # the add is not part of the pattern
            return b.relu(out + x)

        _check(prepared, reference, torch.randn(2, 4, 6, 6))

    def test_error_quantizer_sits_after_output_quantizer(self):
        block = BasicBlock(4, 4)
        recipe = fxquant.Recipe(output="ste_sign", error="ste_sign")
        prepared = fxquant.prepare(block, recipe)
        order = [n.target for n in prepared.graph.nodes if n.op == "call_module"]
        assert order.index("conv1_output_quantizer") + 1 == order.index("conv1_error_quantizer")


class FunctionalOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_w = nn.Parameter(torch.randn(4, 2, 3, 3))
        self.head = nn.Module()
        self.head.weight = nn.Parameter(torch.randn(3, 4 * 5 * 5))
        self.head.bias = nn.Parameter(torch.randn(3))

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.conv_w, None, 1, 1))
        return F.linear(x.flatten(1), self.head.weight, bias=self.head.bias)


class TestFunctional:
    def test_functional_layers_are_found_and_quantized(self):
        model = FunctionalOnly()
        recipe = fxquant.Recipe(weight="magnitude_aware_sign", input="ste_sign")
        prepared = fxquant.prepare(model, recipe)

        def reference(x):
            h = F.relu(F.conv2d(ste_sign(x), magnitude_aware_sign(model.conv_w), None, 1, 1))
            return F.linear(ste_sign(h.flatten(1)), magnitude_aware_sign(model.head.weight),
                            model.head.bias)

        _check(prepared, reference, torch.randn(2, 2, 5, 5))
        assert {"conv_w_weight_quantizer", "head_weight_quantizer"} <= set(
            dict(prepared.named_children()))

    def test_type_rule_on_a_function(self):
        recipe = fxquant.Recipe().for_type(F.linear, weight="ste_sign")
        prepared = fxquant.prepare(FunctionalOnly(), recipe)
        assert hasattr(prepared, "head_weight_quantizer")
        assert not hasattr(prepared, "conv_w_weight_quantizer")


class WithFlag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, augment=True):
        if augment:
            x = x.flip(-1)
        return self.fc(x)


class TestConcreteArgs:
    def test_flag_is_fixed_by_concrete_args(self):
        model = WithFlag()
        prepared = fxquant.prepare(model, fxquant.Recipe(weight="ste_sign"),
                                   concrete_args={"augment": False})
        x = torch.randn(3, 4)
        expected = F.linear(x, ste_sign(model.fc.weight), model.fc.bias)
        prepared.graph.lint()
        torch.testing.assert_close(prepared(x, augment=False), expected, rtol=0, atol=0)
        assert "flip" not in prepared.code

    def test_prepared_model_can_be_traced_again(self):
        prepared = fxquant.prepare(MLP(), fxquant.Recipe.bnn())
        again = trace(prepared)
        again.graph.lint()
        quantizers = [n.target for n in again.graph.nodes if n.op == "call_module"
                      and "quantizer" in str(n.target)]
        assert quantizers == ["fc2_weight_quantizer", "fc2_input_quantizer"]
        x = torch.randn(2, 64)
        assert torch.equal(again(x), prepared(x))


class QuantizedReference(nn.Module):
    """A hand-written binary conv: the oracle for the ResNet test."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x):
        c = self.conv
        return F.conv2d(ste_sign(x), ste_sign(c.weight), c.bias, c.stride, c.padding,
                        c.dilation, c.groups)


def _swap_binary_convs(model: nn.Module, skip: set[str]) -> nn.Module:
    ref = copy.deepcopy(model)
    for name, module in list(ref.named_modules()):
        for child_name, child in list(module.named_children()):
            path = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Conv2d) and path not in skip:
                setattr(module, child_name, QuantizedReference(child))
    return ref


class TestResNet18Style:
    def test_bnn_matches_reference_with_hand_binarized_convs(self):
        model = resnet18(width=8).eval()
        prepared = fxquant.prepare(model, fxquant.Recipe.bnn()).eval()
        reference = _swap_binary_convs(model, skip={"conv1"}).eval()  # fc (last) stays float
        _check(prepared, reference, torch.randn(2, 3, 16, 16))

    def test_bnn_gradients_match_reference_with_hand_binarized_convs(self):
        model = resnet18(width=8).train()
        prepared = fxquant.prepare(model, fxquant.Recipe.bnn())
        reference = _swap_binary_convs(model, skip={"conv1"})
        x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
        for net in (prepared, reference):
            F.cross_entropy(net(x), y).backward()
        got = {n: p.grad for n, p in prepared.named_parameters()}
        want = {n.replace(".conv.", "."): p.grad for n, p in reference.named_parameters()}
        assert got.keys() == want.keys()
        for name in got:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)

    def test_train_step_updates_latent_weights(self):
        prepared = fxquant.prepare(resnet18(width=8), fxquant.Recipe.bnn())
        opt = torch.optim.SGD(prepared.parameters(), lr=0.1)
        conv = prepared.get_submodule("layer1.0.conv1")
        before = conv.weight.detach().clone()
        loss = F.cross_entropy(prepared(torch.randn(4, 3, 16, 16)), torch.tensor([0, 1, 2, 3]))
        loss.backward()
        opt.step()
        assert not torch.equal(before, conv.weight)


class SignAfterEachKind(nn.Module):
    """Binary layers fed by a relu (module and functional), a batch norm and a hardtanh."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.after_module_relu = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.after_bn = nn.Conv2d(4, 4, 3, padding=1)
        self.after_relu = nn.Conv2d(4, 4, 3, padding=1)
        self.after_hardtanh = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        h = self.after_module_relu(self.relu(self.stem(x)))
        h = self.after_bn(self.bn(h))
        h = self.after_relu(torch.relu(h))
        return self.after_hardtanh(F.hardtanh(h).flatten(1))


class TestCompactBinaryInputs:
    def test_a_sign_keeps_its_input_only_where_a_relu_keeps_it_anyway(self):
        prepared = fxquant.prepare(SignAfterEachKind(), fxquant.Recipe(input="ste_sign",
                                                                      weight="ste_sign"))
        keeps = {name.removesuffix("_input_quantizer"): m.save_input
                 for name, m in prepared.named_modules() if name.endswith("_input_quantizer")}
        assert keeps == {"stem": False, "after_module_relu": True, "after_bn": False,
                         "after_relu": True, "after_hardtanh": False}
        assert prepared.code.count("fxquant_nn_") == 5

    def test_gradients_equal_a_hand_written_reference(self):
        model = SignAfterEachKind()
        prepared = fxquant.prepare(model, fxquant.Recipe(input="ste_sign", weight="ste_sign"))
        m = copy.deepcopy(model)

        def reference(x):
            def conv(layer, h):
                return F.conv2d(ste_sign(h), ste_sign(layer.weight), layer.bias, 1, 1)
            h = conv(m.after_module_relu, F.relu(conv(m.stem, x)))
            h = conv(m.after_relu, F.relu(conv(m.after_bn, m.bn(h))))
            h = F.hardtanh(h).flatten(1)
            return F.linear(ste_sign(h), ste_sign(m.after_hardtanh.weight), m.after_hardtanh.bias)

        x = torch.randn(3, 2, 5, 5, requires_grad=True)
        prepared(x).square().sum().backward()
        got = [x.grad.clone()] + [p.grad for p in prepared.parameters()]
        x.grad = None
        reference(x).square().sum().backward()
        want = [x.grad] + [p.grad for p in m.parameters()]
        for g, e in zip(got, want, strict=True):
            torch.testing.assert_close(g, e, rtol=0, atol=0)


class TestWrappersAndSharing:
    def test_data_parallel_wrapper_is_unwrapped(self):
        model = MLP()
        prepared = fxquant.prepare(nn.DataParallel(model), fxquant.Recipe.bnn())
        assert list(prepared.state_dict()) == list(model.state_dict())

    def test_module_called_twice_gets_two_deterministic_quantizers(self):
        model = Twice()
        prepared = fxquant.prepare(model, fxquant.Recipe(weight="ste_tern"))
        assert {"fc_weight_quantizer", "fc_weight_quantizer_1"} <= set(
            dict(prepared.named_children()))
        wq = ste_tern(model.fc.weight)
        _check(prepared, lambda x: F.linear(F.linear(x, wq, model.fc.bias), wq, model.fc.bias),
               torch.randn(2, 3))

    def test_padding_mode_reflect_is_kept(self):
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"))
        prepared = fxquant.prepare(model, fxquant.Recipe(weight="ste_sign"))
        conv = model[0]

        def reference(x):
            return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), ste_sign(conv.weight),
                            conv.bias)

        _check(prepared, reference, torch.randn(1, 2, 5, 5))


@pytest.mark.parametrize("model_fn", [MLP, SmallCNN, lambda: ResNet((1, 1, 1, 1), width=4)])
def test_every_preset_prepares_and_lints(model_fn):
    model = model_fn()
    x = torch.randn(2, 64) if isinstance(model, MLP) else torch.randn(2, 1 if isinstance(
        model, SmallCNN) else 3, 8, 8)
    for recipe in (fxquant.Recipe.bnn(), fxquant.Recipe.xnor(), fxquant.Recipe.bireal(),
                   fxquant.Recipe.twn(), fxquant.Recipe.dorefa(2, 2), fxquant.Recipe.wage()):
        prepared = fxquant.prepare(model, recipe)
        prepared.graph.lint()
        out = prepared(x)
        assert out.shape == model(x).shape
        out.sum().backward()
