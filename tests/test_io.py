"""save()/load(): versioned weights_only files that rebuild prepared and converted models."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant
from fxquant.config import recipe_from_plain, recipe_to_plain
from fxquant.io import VERSION
from fxquant.quantizers import SteTern
from tests.models import MLP, SmallCNN

torch.manual_seed(0)


def _trained(recipe, model=None):
    model = model or SmallCNN()
    prepared = fxquant.prepare(model, recipe)
    opt = torch.optim.SGD(prepared.parameters(), lr=0.1)
    x = torch.randn(8, 1, 8, 8)
    opt.zero_grad()
    prepared(x).square().mean().backward()
    opt.step()
    return prepared.eval(), x


class TestRoundTrip:
    @pytest.mark.parametrize("recipe", [fxquant.Recipe.bnn(), fxquant.Recipe.xnor(),
                                        fxquant.Recipe.twn(), fxquant.Recipe.dorefa(2, 3),
                                        fxquant.Recipe.wage()])
    def test_prepared_and_converted(self, recipe, tmp_path):
        prepared, x = _trained(recipe)
        converted = fxquant.convert(prepared)
        for model, name in ((prepared, "p.fxq"), (converted, "c.fxq")):
            fxquant.save(model, tmp_path / name)
            loaded = fxquant.load(tmp_path / name, SmallCNN()).eval()
            assert fxquant.is_converted(loaded) == (model is converted)
            assert torch.equal(loaded(x), model(x))
            assert loaded.state_dict().keys() == model.state_dict().keys()

    def test_converted_file_is_small(self, tmp_path):
        model = MLP((64, 256, 256, 10))
        converted = fxquant.convert(fxquant.prepare(model, fxquant.Recipe(weight="ste_sign")))
        fxquant.save(converted, tmp_path / "c.fxq")
        torch.save(model.state_dict(), tmp_path / "float.pt")
        ratio = (tmp_path / "c.fxq").stat().st_size / (tmp_path / "float.pt").stat().st_size
        assert ratio < 0.1  # 1 bit per weight + float biases, tables and file overhead

    def test_loaded_prepared_model_trains(self, tmp_path):
        prepared, x = _trained(fxquant.Recipe.bnn())
        fxquant.save(prepared, tmp_path / "p.fxq")
        loaded = fxquant.load(tmp_path / "p.fxq", SmallCNN()).train()
        F.cross_entropy(loaded(x), torch.zeros(8, dtype=torch.long)).backward()
        assert loaded.conv2.weight.grad is not None

    def test_quantizer_settings_changed_after_prepare_are_kept(self, tmp_path):
        prepared = fxquant.prepare(MLP(), fxquant.Recipe(weight="ste_tern"))
        prepared.fc2_weight_quantizer.threshold_value = 0.3
        fxquant.save(prepared, tmp_path / "p.fxq")
        loaded = fxquant.load(tmp_path / "p.fxq", MLP())
        assert loaded.fc2_weight_quantizer.threshold_value == 0.3
        default = prepared.fc1_weight_quantizer.threshold_value
        assert loaded.fc1_weight_quantizer.threshold_value == default

    def test_concrete_args_are_remembered(self, tmp_path):
        class Flag(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(3, 3)

            def forward(self, x, flip=True):
                return self.fc(x.flip(-1) if flip else x)

        prepared = fxquant.prepare(Flag(), fxquant.Recipe(weight="ste_sign"),
                                   concrete_args={"flip": False})
        fxquant.save(prepared, tmp_path / "p.fxq")
        loaded = fxquant.load(tmp_path / "p.fxq", Flag())
        x = torch.randn(2, 3)
        assert torch.equal(loaded(x), prepared(x))


class TestBadFiles:
    @pytest.fixture
    def saved(self, tmp_path):
        prepared, _ = _trained(fxquant.Recipe.bnn())
        path = tmp_path / "m.fxq"
        fxquant.save(fxquant.convert(prepared), path)
        return path

    def test_truncated_file(self, saved):
        saved.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
        with pytest.raises(ValueError, match="not a readable fxquant file"):
            fxquant.load(saved, SmallCNN())

    def test_garbage_file(self, tmp_path):
        path = tmp_path / "junk.fxq"
        path.write_bytes(b"\x00garbage" * 100)
        with pytest.raises(ValueError, match="not a readable fxquant file"):
            fxquant.load(path, SmallCNN())

    def test_wrong_version(self, saved):
        data = torch.load(saved, weights_only=True)
        data["version"] = VERSION + 1
        torch.save(data, saved)
        with pytest.raises(ValueError, match="version"):
            fxquant.load(saved, SmallCNN())

    def test_not_an_fxquant_file(self, tmp_path):
        torch.save(MLP().state_dict(), tmp_path / "sd.pt")
        with pytest.raises(ValueError, match="not an fxquant file"):
            fxquant.load(tmp_path / "sd.pt", MLP())

    def test_wrong_model_class(self, saved):
        with pytest.raises(ValueError, match="does not match this model"):
            fxquant.load(saved, MLP())

    def test_file_with_pickled_code_is_refused(self, tmp_path):
        path = tmp_path / "evil.fxq"
        torch.save({"format": "fxquant", "version": VERSION, "payload": SmallCNN()}, path)
        with pytest.raises(ValueError, match="not a readable fxquant file"):
            fxquant.load(path, SmallCNN())

    def test_save_needs_a_fxquant_model(self, tmp_path):
        with pytest.raises(ValueError, match="fxquant.prepare"):
            fxquant.save(torch.fx.symbolic_trace(MLP()), tmp_path / "x.fxq")

    def test_unsaveable_recipe_is_reported_at_save(self, tmp_path):
        class Local(nn.Linear):
            pass

        with pytest.warns(UserWarning, match="quantizes no layer"):
            prepared = fxquant.prepare(MLP(), fxquant.Recipe().for_type(Local, weight="ste_sign"))
        with pytest.raises(ValueError, match="cannot be saved"):
            fxquant.save(prepared, tmp_path / "x.fxq")


def test_recipe_plain_round_trip():
    recipe = (fxquant.Recipe(weight=SteTern(threshold_value=0.2), input="ste_sign",
                             keep_first_last=True)
              .for_type(nn.Conv2d, weight="dorefa").for_type(F.linear, input=None)
              .for_regex(r"layer\d", output=lambda: SteTern(ternary_weight_networks=True))
              .for_name("fc", error=None).for_first(input="ste_sign").for_last(output=None))
    again = recipe_from_plain(recipe_to_plain(recipe))
    assert recipe_to_plain(again) == recipe_to_plain(recipe)
    assert [r.describe() for r in again.rules] == [r.describe() for r in recipe.rules]
    assert again.rules[1].key is F.linear and again.rules[0].key is nn.Conv2d


class TestErrorsThatTeach:
    @pytest.fixture
    def saved(self, tmp_path):
        prepared, _ = _trained(fxquant.Recipe.bnn())
        path = tmp_path / "m.fxq"
        fxquant.save(prepared, path)
        return path

    def test_passing_the_class_says_to_pass_an_instance(self, saved):
        with pytest.raises(TypeError, match=r"the class SmallCNN; pass an instance: SmallCNN\(\)"):
            fxquant.load(saved, SmallCNN)

    @pytest.mark.parametrize("wrong, key", [(MLP, "fc1.weight"),
                                            (lambda: nn.Sequential(nn.ReLU()), "conv1.weight")])
    def test_wrong_model_is_one_error_without_spurious_warnings(self, saved, wrong, key):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # prepare warns "the recipe quantizes no layer"
            with pytest.raises(ValueError, match=r"does not match this model") as error:
                fxquant.load(saved, wrong())
        assert key in str(error.value) and "model class the file was saved from" in str(
            error.value)
        assert [str(w.message) for w in caught] == []

    def test_a_torch_saved_graph_module_is_refused_with_the_fix(self, tmp_path):
        prepared, _ = _trained(fxquant.Recipe.bnn())
        torch.save(prepared, tmp_path / "pickled.pt")
        with pytest.raises(ValueError, match=r"torch.save\(model, path\).*fxquant.save"):
            fxquant.load(tmp_path / "pickled.pt", SmallCNN())
        with pytest.raises(pickle.UnpicklingError, match="weights_only"):  # as fxquant.save says
            torch.load(tmp_path / "pickled.pt")

    @pytest.mark.parametrize("copy_of", [lambda m: m, copy.deepcopy,
                                         lambda m: pickle.loads(pickle.dumps(m))],
                             ids=["converted", "deepcopy", "pickle"])
    def test_float_checkpoint_into_a_converted_model_says_load_before_convert(self, copy_of):
        model = SmallCNN()
        prepared, x = _trained(fxquant.Recipe.bnn(), model)
        converted = copy_of(fxquant.convert(prepared))
        with pytest.raises(RuntimeError, match=r"\(conv2\.weight\).*into the prepared model "
                                               r"\(or into the float model before"):
            converted.load_state_dict(prepared.state_dict())
        with pytest.raises(RuntimeError, match="then convert"):
            nn.Sequential(converted).load_state_dict(
                {f"0.{k}": v for k, v in model.state_dict().items()})
        expected = fxquant.convert(prepared)(x)
        converted.load_state_dict(fxquant.convert(prepared).state_dict())  # its own: fine
        assert torch.equal(converted(x), expected)

    def test_loading_a_converted_file_keeps_the_guard(self, saved, tmp_path):
        prepared = fxquant.load(saved, SmallCNN())
        fxquant.save(fxquant.convert(prepared), tmp_path / "c.fxq")
        converted = fxquant.load(tmp_path / "c.fxq", SmallCNN())
        with pytest.raises(RuntimeError, match="then convert"):
            converted.load_state_dict(prepared.state_dict())
