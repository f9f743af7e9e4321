"""convert(): exact lowering, BN folding, packing, no latent weights, export and reload."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant.graph.meta import get_record
from tests.models import MLP, SmallCNN, resnet18

torch.manual_seed(0)

RECIPES = {
    "bnn": fxquant.Recipe.bnn,
    "xnor": fxquant.Recipe.xnor,
    "bireal": fxquant.Recipe.bireal,
    "twn": fxquant.Recipe.twn,
    "dorefa": lambda: fxquant.Recipe.dorefa(3, 2),
    "wage": fxquant.Recipe.wage,
    "all_layers_binary": lambda: fxquant.Recipe(weight="ste_sign", input="ste_sign",
                                                 output="ste_tern"),
}


def _trained(model: nn.Module, recipe: fxquant.Recipe, x: torch.Tensor) -> torch.fx.GraphModule:
    prepared = fxquant.prepare(model, recipe)
    opt = torch.optim.SGD(prepared.parameters(), lr=0.05)
    for _ in range(2):  # a couple of real steps so latent weights and BN stats move
        opt.zero_grad()
        prepared(x).square().mean().backward()
        opt.step()
        fxquant.training.clip_latent_weights(prepared, bits=None)
    return prepared.eval()


class TestExactness:
    @pytest.mark.parametrize("name", sorted(RECIPES))
    def test_bit_for_bit_without_batch_norm(self, name):
        x = torch.randn(16, 64)
        prepared = _trained(MLP(), RECIPES[name](), x)
        converted = fxquant.convert(prepared)
        converted.graph.lint()
        probe = torch.cat([x, torch.zeros(1, 64), -torch.ones(1, 64)])
        torch.testing.assert_close(converted(probe), prepared(probe), rtol=0, atol=0)

    @pytest.mark.parametrize("name", ["bnn", "xnor", "twn", "dorefa", "all_layers_binary"])
    def test_batch_norm_folded_within_1e_5(self, name):
        x = torch.randn(8, 1, 8, 8)
        prepared = _trained(SmallCNN(), RECIPES[name](), x)
        converted = fxquant.convert(prepared)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in converted.modules())
        torch.testing.assert_close(converted(x), prepared(x), rtol=1e-5, atol=1e-5)

    def test_resnet18_style_bnn(self):
        x = torch.randn(2, 3, 16, 16)
        prepared = _trained(resnet18(width=8), fxquant.Recipe.bnn(), x)
        converted = fxquant.convert(prepared)
        torch.testing.assert_close(converted(x), prepared(x), rtol=1e-5, atol=1e-5)


class TestLowering:
    def test_prepared_model_is_not_modified(self):
        prepared = _trained(SmallCNN(), fxquant.Recipe.bnn(), torch.randn(4, 1, 8, 8))
        before_state, before_code = copy.deepcopy(prepared.state_dict()), prepared.code
        fxquant.convert(prepared)
        assert prepared.code == before_code
        assert prepared.state_dict().keys() == before_state.keys()
        assert all(torch.equal(prepared.state_dict()[k], v) for k, v in before_state.items())

    def test_no_latent_weights_no_quantizer_modules_and_plain_sign(self):
        converted = fxquant.convert(_trained(MLP(), fxquant.Recipe.bnn(), torch.randn(4, 64)))
        names = dict(converted.named_parameters())
        assert "fc2.weight" not in names and "fc2.weight" not in converted.state_dict()
        assert {"fc2.weight_packed.codes", "fc2.weight_packed.table"} <= set(converted.state_dict())
        assert converted.state_dict()["fc2.weight_packed.codes"].dtype == torch.uint8
        assert not any(isinstance(m, fxquant.quantizers.Quantizer) for m in converted.modules())
        assert "torch.where" in converted.code and "quantizer" not in converted.code
        roles = {get_record(n).role for n in converted.graph.nodes if get_record(n)}
        assert "packed_weight" in roles

    def test_converting_twice_is_an_error(self):
        converted = fxquant.convert(fxquant.prepare(MLP(), fxquant.Recipe.bnn()))
        assert fxquant.is_converted(converted)
        with pytest.raises(ValueError, match="already converted"):
            fxquant.convert(converted)

    def test_convert_needs_a_prepared_model(self):
        with pytest.raises(TypeError, match="fxquant.prepare"):
            fxquant.convert(torch.fx.symbolic_trace(MLP()))

    def test_error_quantizers_disappear(self):
        prepared = fxquant.prepare(MLP(), fxquant.Recipe.wage())
        assert "error_quantizer" in prepared.code
        assert "error_quantizer" not in fxquant.convert(prepared).code


@pytest.fixture(scope="module")
def pair():
    x = torch.randn(4, 1, 8, 8)
    prepared = _trained(SmallCNN(), fxquant.Recipe.xnor(), x)
    return prepared, fxquant.convert(prepared), x


class TestExport:
    def test_torch_export(self, pair):
        _, converted, x = pair
        exported = torch.export.export(converted, (x,))
        torch.testing.assert_close(exported.module()(x), converted(x), rtol=0, atol=0)

    def test_to_folder_writes_importable_code(self, pair, tmp_path):
        _, converted, x = pair
        converted.to_folder(tmp_path / "exported_model", "Exported")
        sys.path.insert(0, str(tmp_path))
        try:
            from exported_model import Exported
        finally:
            sys.path.remove(str(tmp_path))
        torch.testing.assert_close(Exported()(x), converted(x), rtol=0, atol=0)

    @pytest.mark.parametrize("which", [0, 1], ids=["prepared", "converted"])
    def test_torch_save_load_in_a_fresh_process(self, pair, which, tmp_path):
        model, x = pair[which], pair[2]
        torch.save(model, tmp_path / "model.pt")
        torch.save({"x": x, "y": model(x)}, tmp_path / "io.pt")
        script = textwrap.dedent(f"""
            import torch
            model = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False)
            io = torch.load({str(tmp_path / 'io.pt')!r})
            assert torch.equal(model(io["x"]), io["y"]), "outputs differ"
            print("ok")
        """)
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr

    def test_prepared_reloaded_model_can_resume_training(self, pair, tmp_path):
        prepared = pair[0]
        torch.save(prepared, tmp_path / "p.pt")
        again = torch.load(tmp_path / "p.pt", weights_only=False).train()
        again(torch.randn(2, 1, 8, 8)).sum().backward()
        assert again.conv2.weight.grad is not None


def test_convert_refuses_disabled_quantizers():
    prepared = fxquant.prepare(MLP(), fxquant.Recipe.bnn())
    fxquant.training.set_quantizers_enabled(prepared, False, roles="input")
    with pytest.raises(ValueError, match="fc2_input_quantizer.*disabled"):
        fxquant.convert(prepared)


class SharedConv(nn.Module):
    """A float conv called twice; batch norm follows only its first call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.head = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)) + self.conv(x))


def test_batch_norm_is_not_folded_into_a_module_called_twice():
    model = SharedConv()
    with torch.no_grad():  # make the BN far from identity so a wrong fold shows
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.weight.uniform_(0.5, 2)
    recipe = fxquant.Recipe(weight="ste_sign").for_name("conv", weight=None)
    prepared = fxquant.prepare(model, recipe).eval()
    converted = fxquant.convert(prepared)
    x = torch.randn(2, 2, 5, 5)
    torch.testing.assert_close(converted(x), prepared(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(converted.conv.weight, model.conv.weight)  # left unscaled


def test_learned_quantizer_tensors_become_buffers_of_the_converted_model():
    from fxquant.quantizers import AffineKBitQuantize, k_bit_quantize

    prepared = fxquant.prepare(MLP(), fxquant.Recipe(input=AffineKBitQuantize(4))).eval()
    with torch.no_grad():
        prepared.fc2_input_quantizer.w.fill_(0.75)
        prepared.fc2_input_quantizer.b.fill_(-0.25)
    converted = fxquant.convert(prepared)
    assert converted.fc2_input_quantizer_w.item() == 0.75
    x = torch.rand(3, 64)
    torch.testing.assert_close(converted(x), prepared(x), rtol=0, atol=0)
    # hand-written oracle: fc1's quantizer keeps w = 1, b = 0; fc3's too
    h = torch.relu(prepared.fc1(k_bit_quantize(x.flatten(1), 4)))
    h = torch.relu(prepared.fc2(0.75 * k_bit_quantize(h, 4) - 0.25))
    out = prepared.fc3(k_bit_quantize(h, 4))
    torch.testing.assert_close(converted(x), out, rtol=1e-6, atol=1e-6)


class TestSideEffectsSurvive:
    """convert's dead-code elimination drops only nodes known to be pure (repro r8)."""

    class InPlace(nn.Module):
        def __init__(self, op) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)
            self.op = op

        def forward(self, x):
            h = self.b(self.a(x))
            self.op(h)  # in place, its result unused
            h.abs()  # pure and unused: may go
            return self.c(h)

    @pytest.mark.parametrize("name, op, hand", [
        ("method", lambda h: h.mul_(0.5), lambda h: h * 0.5),
        ("function", torch.relu_, torch.relu),
        ("setitem", lambda h: h.__setitem__((slice(None), 0), 7.0),
         lambda h: torch.cat([torch.full_like(h[:, :1], 7.0), h[:, 1:]], 1)),
        ("inplace_kwarg", lambda h: torch.nn.functional.relu(h, inplace=True), torch.relu),
        ("inplace_positional", lambda h: torch.nn.functional.hardtanh(h, -0.1, 0.1, True),
         lambda h: h.clamp(-0.1, 0.1)),
        ("out_kwarg", lambda h: torch.mul(h, 2.0, out=h), lambda h: h * 2.0),
    ])
    def test_unused_in_place_op_is_kept(self, name, op, hand):
        model = self.InPlace(op)
        x = torch.randn(3, 4)
        prepared = fxquant.prepare(model, fxquant.Recipe.bnn()).eval()
        converted = fxquant.convert(prepared)
        converted.graph.lint()
        with torch.no_grad():
            out = converted(x)
            assert torch.equal(out, prepared(x))
            # hand-written oracle: float a, binary b (sign of weight and input), in-place op, c
            sign = lambda t: torch.where(t >= 0, 1.0, -1.0)  # noqa: E731
            h = F.linear(sign(model.a(x)), sign(model.b.weight), model.b.bias)
            torch.testing.assert_close(out, model.c(hand(h)), rtol=1e-6, atol=1e-6)
        assert not any(n.op == "call_method" and n.target == "abs" for n in converted.graph.nodes)

    def test_pure_nodes_quantizers_and_attribute_reads_are_dropped(self):
        from fxquant.graph.passes import eliminate_dead_code
        from fxquant.graph.passes.lower import is_pure_node
        from fxquant.graph.tracer import QuantTracer

        class M(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.q = fxquant.quantizers.get("ste_sign")
                self.lin = nn.Linear(2, 2)
                self.drop = nn.Dropout(0.5)

            def forward(self, x):
                self.q(x)
                self.lin.weight.t()
                torch.rand_like(x)  # draws random numbers: kept
                torch._assert(x.dim() == 2, "2D")  # a check: kept
                self.drop(x)  # a module fxquant does not know: kept
                return torch.relu(x)

        model = M()
        gm = torch.fx.GraphModule(model, QuantTracer().trace(model))
        kinds = {n.name: is_pure_node(gm, n) for n in gm.graph.nodes}
        assert kinds["q"] and kinds["lin_weight"] and kinds["t"] and kinds["relu"]
        assert not kinds["rand_like"] and not kinds["_assert"] and not kinds["drop"]
        assert not kinds["x"] and not kinds["output"]
        eliminate_dead_code(gm)
        gm.graph.lint()
        gm.recompile()
        names = {n.name for n in gm.graph.nodes}
        assert {"rand_like", "_assert", "drop", "relu"} <= names
        assert not {"q", "lin_weight", "t"} & names
        assert not hasattr(gm, "q")  # the unused quantizer module is gone too


class TestWeightReadTwice:
    """A forward that reads a quantized layer's weight for something else too (repro r9)."""

    class ReadsDtype(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            x = x.to(self.b.weight.dtype)  # only the dtype of b.weight
            return self.c(self.b(self.a(x))) * self.b.weight.shape[0]

    class ReadsValues(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            h = self.b(self.a(x))
            return self.c(h + h @ self.b.weight.t())  # the latent weight's values

    @pytest.mark.parametrize("recipe", ["bnn", "dorefa"])
    def test_metadata_reads_see_the_folded_weight(self, recipe):
        prepared = fxquant.prepare(self.ReadsDtype(), RECIPES[recipe]()).eval()
        converted = fxquant.convert(prepared)
        converted.graph.lint()
        x = torch.randn(3, 4, dtype=torch.float64)
        with torch.no_grad():
            out = converted(x)
            assert out.dtype == torch.float32 and torch.equal(out, prepared(x))
        assert "b.weight" not in dict(converted.named_parameters())  # no latent weight left
        reads = [n for n in converted.graph.nodes if n.op in ("get_attr", "call_module")
                 and str(n.target).startswith("b.weight")]
        assert len(reads) == 1  # one read of the constant serves the layer and the dtype

    def test_value_reads_keep_the_latent_weight(self):
        prepared = fxquant.prepare(self.ReadsValues(), fxquant.Recipe.bnn()).eval()
        converted = fxquant.convert(prepared)
        converted.graph.lint()
        x = torch.randn(3, 4)
        with torch.no_grad():
            assert torch.equal(converted(x), prepared(x))
            # hand-written oracle: b uses sign(W) on sign(input), the matmul the latent W
            sign = lambda t: torch.where(t >= 0, 1.0, -1.0)  # noqa: E731
            w = prepared.b.weight
            h = F.linear(sign(prepared.a(x)), sign(w), prepared.b.bias)
            torch.testing.assert_close(converted(x), prepared.c(h + h @ w.t()), rtol=1e-6,
                                       atol=1e-6)
        assert torch.equal(converted.b.weight, prepared.b.weight)

    def test_module_calling_its_own_tied_weight_keeps_the_latent(self):
        class TiedLM(nn.Module):  # the output layer reuses the embedding's weight
            def __init__(self) -> None:
                super().__init__()
                self.emb, self.mid = nn.Embedding(10, 8), nn.Linear(8, 8)

            def forward(self, idx):
                return F.linear(self.mid(self.emb(idx)), self.emb.weight)

        model = TiedLM()
        prepared = fxquant.prepare(model, fxquant.Recipe(weight="ste_sign")).eval()
        converted = fxquant.convert(prepared)
        converted.graph.lint()
        idx = torch.tensor([[1, 2, 3], [9, 0, 4]])
        with torch.no_grad():
            out = converted(idx)
            assert torch.equal(out, prepared(idx))
            # hand-written oracle: float embedding lookup, binary weights in both layers
            h = F.linear(model.emb(idx), torch.sign(model.mid.weight), model.mid.bias)
            torch.testing.assert_close(out, F.linear(h, torch.sign(model.emb.weight)),
                                       rtol=1e-6, atol=1e-6)
        assert torch.equal(converted.emb.weight, model.emb.weight)
