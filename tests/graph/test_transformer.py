"""torch.nn transformer layers are traced through, so their Linears are quantized.

Oracle: the float torch.nn module itself (quantizers disabled), bit for bit on the composite
path; under ``no_grad`` in eval torch may take its fused kernel, which rounds differently.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxquant
from fxquant.training import quantizers, set_quantizers_enabled


class EncoderDecoder(nn.Module):
    def __init__(self, batch_first: bool, norm_first: bool) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, batch_first=batch_first,
                                           norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16),
                                         enable_nested_tensor=False)
        self.dec = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(16, 4, 32, dropout=0.1, batch_first=batch_first,
                                       norm_first=norm_first), 2)
        self.out = nn.Linear(16, 4)

    def forward(self, x, mask=None):
        h = self.inp(x)
        memory = self.enc(h) if mask is None else self.enc(h, mask=mask)
        return self.out(self.dec(h, memory))


def _prepare(model: nn.Module) -> torch.fx.GraphModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxquant.prepare(model, fxquant.Recipe(weight="ste_sign", input="ste_sign"),
                               concrete_args={"mask": None})


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("norm_first", [False, True])
def test_every_linear_of_the_stack_is_quantized_and_the_float_path_is_unchanged(
        batch_first, norm_first):
    torch.manual_seed(0)
    model = EncoderDecoder(batch_first, norm_first)
    prepared = _prepare(model)
    prepared.graph.lint()
    layers = {e.record.layer for e in quantizers(prepared)}
    expected = {f"{stack}.layers.{i}.{name}" for stack in ("enc", "dec") for i in range(2)
                for name in ("linear1", "linear2", "self_attn.out_proj")}
    expected |= {f"dec.layers.{i}.multihead_attn.out_proj" for i in range(2)}
    assert expected <= layers
    assert "enc.layers.0.self_attn.in_proj_weight" in layers
    set_quantizers_enabled(prepared, False)
    x = torch.randn(3, 5, 8)
    for mode in (True, False):  # dropout under the same seed in train mode
        model.train(mode), prepared.train(mode)
        torch.manual_seed(1)
        expected_out = model(x)
        torch.manual_seed(1)
        assert torch.equal(prepared(x), expected_out)
    with torch.no_grad():  # the float stack may use torch's fused inference kernel here
        torch.testing.assert_close(prepared(x), model(x), rtol=0, atol=1e-5)


def test_a_call_with_masks_stays_a_float_leaf_and_is_reported():
    model = EncoderDecoder(True, False)

    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, x):
            return self.net(x, mask=torch.zeros(5, 5))

    with pytest.warns(UserWarning, match=r"enc\.layers\.0\.linear1"):
        prepared = fxquant.prepare(Masked(), fxquant.Recipe(weight="ste_sign"))
    assert any(n.op == "call_module" and n.target == "net.enc" for n in prepared.graph.nodes)
    set_quantizers_enabled(prepared, False)
    model.eval(), prepared.eval()
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(prepared(x), Masked().eval()(x), rtol=0, atol=1e-5)
