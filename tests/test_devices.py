"""Devices and dtypes: pack on the weight's device, WAGE generators follow .to(), load keeps dtypes.

The CUDA tests run where CUDA exists and skip elsewhere; the CPU tests check the same device
logic without a GPU (a ``meta`` default device catches a factory call that forgets ``device=``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxquant
from fxquant.ops import pack, unpack
from fxquant.wage import QG, QW, WAGEError, WAGEQuantizer, WAGEWeight
from fxquant.wage.quantizer import wage_quantize, wage_weight_quantize
from fxquant.wage.training import seed_rounding
from tests.models import MLP, SmallCNN

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# (bits, weight) with at most 2**bits distinct values (two per row for 1 bit)
PACKABLE = [
    (1, torch.tensor([[0.5, -0.5, 0.5, 0.5, -0.5], [2.0, 2.0, -1.0, 2.0, -1.0]])),
    (2, torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, 1.0], [-1.0, -1.0, 0.0]])),
    (3, torch.tensor([[0.25, -0.75, 0.0, 0.5], [-0.25, 0.75, 1.0, -1.0]])),
    (8, torch.arange(-32.0, 32.0).view(8, 8) / 16),
]


def _wage_modules(gm: nn.Module) -> list[nn.Module]:
    return [m for m in gm.modules() if isinstance(m, (WAGEQuantizer, WAGEError, WAGEWeight))]


def _stochastic_wage() -> torch.fx.GraphModule:
    recipe = fxquant.Recipe.wage(A_mode="stochastic", E_mode="stochastic")
    return fxquant.prepare(MLP((12, 16, 16, 4)), recipe)


class TestPackDevice:
    @pytest.mark.parametrize(("bits", "w"), PACKABLE)
    def test_pack_creates_every_tensor_on_the_weights_device(self, bits, w):
        with torch.device("meta"):  # a factory call without device= would make a meta tensor
            codes, table = pack(w, bits)
            restored = unpack(codes, table, tuple(w.shape), bits)
        assert codes.device == table.device == restored.device == w.device
        assert torch.equal(restored, w)

    @cuda
    @pytest.mark.parametrize(("bits", "w"), PACKABLE)
    def test_pack_round_trips_on_cuda(self, bits, w):
        codes, table = pack(w.cuda(), bits)
        assert codes.is_cuda and table.is_cuda
        assert torch.equal(unpack(codes, table, tuple(w.shape), bits).cpu(), w)

    @cuda
    def test_converted_model_runs_on_cuda_as_the_prepared_model(self):
        prepared = fxquant.prepare(MLP((12, 16, 16, 4)), fxquant.Recipe.twn()).cuda().eval()
        converted = fxquant.convert(prepared)
        converted.graph.lint()
        x = torch.randn(5, 12, device="cuda")
        torch.testing.assert_close(converted(x), prepared(x), rtol=0, atol=1e-6)


class TestWAGEGeneratorDevice:
    @pytest.mark.parametrize("move", [lambda m: m.to(torch.float64), lambda m: m.to("cpu"),
                                      lambda m: m.cpu(), lambda m: m.half(), lambda m: m.float()],
                             ids=["to_float64", "to_cpu", "cpu", "half", "float"])
    def test_a_move_that_keeps_the_device_keeps_the_very_generator(self, move):
        prepared = _stochastic_wage()
        before = seed_rounding(prepared, 3)
        move(prepared)
        after = {name: m.generator for name, m in prepared.named_modules()
                 if isinstance(m, (WAGEQuantizer, WAGEError, WAGEWeight))}
        assert after.keys() == before.keys()
        assert all(after[name] is before[name] for name in before)

    def test_meta_has_no_generators_so_the_old_one_stays_and_rounding_says_so(self):
        q = WAGEQuantizer(8, 8, "stochastic", generator=torch.Generator().manual_seed(0))
        generator = q.generator
        q.to("meta")
        assert q.generator is generator
        with pytest.raises(ValueError, match=r"generator for stochastic rounding is on cpu but "
                                             r"the tensor is on meta"):
            q(torch.zeros(3, device="meta"))

    @pytest.mark.parametrize("call", [
        lambda x, g: wage_quantize(x, 8, 8, "stochastic", "nearest", g),
        lambda x, g: wage_quantize(x, 8, 8, "nearest", "stochastic", g),
        lambda x, g: wage_weight_quantize(x, 2, 1.0, "stochastic", g),
        lambda x, g: QW(x, 2, 1.0, "stochastic", g),
        lambda x, g: QG(x, 8, 8.0, "stochastic", g),
    ], ids=["QA", "QE", "wage_weight", "QW", "QG"])
    def test_a_generator_on_another_device_is_a_clear_error(self, call):
        with pytest.raises(ValueError, match=r"is on cpu but the tensor is on meta.*"
                                             r"torch\.Generator\(device='meta'\)"):
            call(torch.zeros(4, device="meta"), torch.Generator())

    def test_nearest_rounding_ignores_the_generators_device(self):
        x = torch.zeros(4, device="meta")
        assert wage_quantize(x, 8, 8, "nearest", "nearest", torch.Generator()).device == x.device
        assert QW(x, 2, 1.0, "nearest", torch.Generator()).device == x.device

    @cuda
    def test_cuda_moves_every_generator_and_seed_then_move_equals_move_then_seed(self):
        def run(model):
            torch.manual_seed(0)
            x = torch.randn(6, 12, device="cuda", requires_grad=True)
            model(x).square().sum().backward()
            return x.grad

        moved_after = _stochastic_wage()
        seed_rounding(moved_after, 5)
        moved_after.cuda()
        assert all(m.generator.device.type == "cuda" for m in _wage_modules(moved_after))
        moved_before = _stochastic_wage()
        moved_before.load_state_dict(moved_after.state_dict())
        moved_before.cuda()
        seed_rounding(moved_before, 5)
        assert torch.equal(run(moved_after), run(moved_before))
        moved_after.cpu()
        assert all(m.generator.device.type == "cpu" for m in _wage_modules(moved_after))

    @cuda
    def test_a_cpu_generator_with_cuda_input_is_a_clear_error(self):
        q = WAGEWeight(2, mode="stochastic", generator=torch.Generator())
        with pytest.raises(ValueError, match=r"is on cpu but the tensor is on cuda"):
            q(torch.zeros(3, device="cuda"))


def _saved_and_loaded(tmp_path, prepared, dtype, converted):
    prepared = prepared.to(dtype).eval()
    model = fxquant.convert(prepared) if converted else prepared
    fxquant.save(model, tmp_path / "m.fxq")
    loaded = fxquant.load(tmp_path / "m.fxq", SmallCNN()).eval()
    loaded.graph.lint()
    return model, loaded


class TestLoadDtype:
    @pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
    @pytest.mark.parametrize("converted", [False, True], ids=["prepared", "converted"])
    @pytest.mark.parametrize("recipe", [fxquant.Recipe.bnn().with_nonnegative_inputs("ignore"),
                                        fxquant.Recipe.dorefa(2, 3),
                                        fxquant.Recipe.wage()], ids=["bnn", "dorefa", "wage"])
    def test_a_model_saved_in_a_dtype_loads_in_it(self, tmp_path, dtype, converted, recipe):
        torch.manual_seed(0)
        prepared = fxquant.prepare(SmallCNN(), recipe)
        prepared(torch.randn(8, 1, 8, 8))  # batch-norm statistics differ from a fresh model's
        model, loaded = _saved_and_loaded(tmp_path, prepared, dtype, converted)
        dtypes = {k: v.dtype for k, v in model.state_dict().items()}
        assert {k: v.dtype for k, v in loaded.state_dict().items()} == dtypes
        assert dtype in dtypes.values()
        x = torch.randn(4, 1, 8, 8, dtype=dtype)
        out = loaded(x)
        assert out.dtype == dtype
        assert torch.equal(out, model(x))

    def test_mixed_dtypes_load_per_tensor(self, tmp_path):
        torch.manual_seed(0)
        prepared = fxquant.prepare(SmallCNN(), fxquant.Recipe.dorefa(2, 3)).eval()
        prepared.fc.double()  # only the last layer in float64
        fxquant.save(prepared, tmp_path / "m.fxq")
        loaded = fxquant.load(tmp_path / "m.fxq", SmallCNN()).eval()
        assert loaded.fc.weight.dtype == torch.float64
        assert loaded.conv1.weight.dtype == torch.float32
        assert {k: v.dtype for k, v in loaded.state_dict().items()} == \
            {k: v.dtype for k, v in prepared.state_dict().items()}
        for name, p in loaded.named_parameters():
            assert torch.equal(p, prepared.get_parameter(name))

    @cuda
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_load_into_a_cuda_model_keeps_its_device_and_the_files_dtype(self, tmp_path, dtype):
        prepared = fxquant.prepare(SmallCNN(), fxquant.Recipe.dorefa(2, 3)).to(dtype).eval()
        fxquant.save(prepared, tmp_path / "m.fxq")
        loaded = fxquant.load(tmp_path / "m.fxq", SmallCNN().cuda()).eval()
        assert all(t.is_cuda and (not t.is_floating_point() or t.dtype == dtype)
                   for t in loaded.state_dict().values())
        x = torch.randn(4, 1, 8, 8, dtype=dtype)
        torch.testing.assert_close(loaded(x.cuda()).cpu(), prepared(x))  # CPU and CUDA kernels
