"""fold_weight_quantizers and fold_batch_norm: constants computed once at convert time."""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx
from torch import nn

from fxquant.graph.meta import QuantRecord, get_record, set_record

__all__ = ["fold_weight_quantizers", "fold_batch_norm", "FoldedLayer"]

_SPATIAL_DIMS = {"linear": 0, "conv1d": 1, "conv2d": 2, "conv3d": 3}


class FoldedLayer(nn.Module):
    """Holds a converted layer's constants (folded weight, bias) once its module is not called.

    A ``Conv2d`` whose weight became a packed buffer would mislead readers and break
    ``GraphModule.to_folder`` (which rebuilds standard modules from their repr).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        for name, param in module._parameters.items():
            self.register_parameter(name, param)
        for name, buffer in module._buffers.items():
            self.register_buffer(name, buffer, persistent=name not in
                                 module._non_persistent_buffers_set)


def _replace_called_module_types(gm: torch.fx.GraphModule, owners: set[str]) -> None:
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    for path in owners - called - {""}:
        parent, _, child = path.rpartition(".")
        module = gm.get_submodule(path)
        if not isinstance(module, FoldedLayer) and not list(module.children()):
            setattr(gm.get_submodule(parent), child, FoldedLayer(module))


def _owner(gm: torch.fx.GraphModule, target: str) -> tuple[nn.Module, str]:
    owner, _, attr = target.rpartition(".")
    return gm.get_submodule(owner), attr


def fold_weight_quantizers(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Evaluate each weight quantizer on its latent weight once; store the result as a buffer.

    The latent parameter becomes a buffer of the same name holding the quantized value, so the
    state_dict key stays and the layer reads a constant. If the parameter also feeds something
    else (tied weights), or two quantizers of it disagree, the value gets its own buffer
    ``<name>_quantized[_i]`` and the parameter stays.
    """
    latents: dict[str, torch.Tensor] = {}
    for node in list(gm.graph.nodes):
        record = get_record(node)
        source = node.args[0] if node.args else None
        if (record is None or record.role != "weight_quantizer"
                or not isinstance(source, torch.fx.Node) or source.op != "get_attr"):
            continue
        target = str(source.target)
        owner, attr = _owner(gm, target)
        latent = latents.setdefault(target, getattr(owner, attr).detach())
        with torch.no_grad():
            value = gm.get_submodule(str(node.target)).eval()(latent).clone()
        if len(source.users) == 1 and isinstance(owner._parameters.get(attr), nn.Parameter):
            delattr(owner, attr)
            owner.register_buffer(attr, value)
        elif not (attr in owner._buffers and torch.equal(owner._buffers[attr], value)):
            name, i = f"{attr}_quantized", 0
            while hasattr(owner, name):
                i += 1
                name = f"{attr}_quantized_{i}"
            owner.register_buffer(name, value)
            with gm.graph.inserting_before(node):
                source = gm.graph.get_attr(f"{target.rpartition('.')[0]}.{name}".lstrip("."))
        set_record(source, QuantRecord("folded_weight", record.layer, record.op, record.module,
                                       quantizer=record.quantizer, bits=record.bits,
                                       tensors=(str(source.target),), numel=value.numel()))
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
    _replace_called_module_types(gm, {t.rpartition(".")[0] for t in latents})
    return gm


def _foldable_bn(gm: torch.fx.GraphModule, node: torch.fx.Node) -> nn.Module | None:
    if node.op != "call_module" or len(node.args) != 1:
        return None
    bn = gm.get_submodule(str(node.target))
    if (not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.training
            or bn.running_mean is None or bn.running_var is None):
        return None
    layer = node.args[0]
    record = get_record(layer) if isinstance(layer, torch.fx.Node) else None
    if record is None or record.role != "layer" or len(layer.users) != 1:
        return None
    return bn


def fold_batch_norm(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Fold each eval-mode BatchNorm that directly follows a weighted layer.

    Float layers absorb it into their weight and bias. Layers with quantized weights keep their
    ±1 / {-1, 0, 1} / k-bit weights untouched and get ``y * scale + shift`` after
    the layer, the per-channel multiplier and bias that binary inference engines use. Either way
    the result equals the BN to float rounding (about 1e-6 relative): ``y·s + t`` and
    ``(y − μ)/sqrt(σ² + ε)·γ + β`` round differently.
    """
    calls = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
    for node in list(gm.graph.nodes):
        bn = _foldable_bn(gm, node)
        if bn is None:
            continue
        layer = node.args[0]
        with torch.no_grad():
            scale = torch.rsqrt(bn.running_var + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight
            shift = -bn.running_mean * scale
            if bn.bias is not None:
                shift = shift + bn.bias
        if _fold_into_float_layer(gm, layer, scale, shift, calls):
            node.replace_all_uses_with(layer)
        else:
            view = (-1,) + (1,) * _SPATIAL_DIMS[get_record(layer).op]
            prefix = str(node.target).replace(".", "_")
            gm.register_buffer(f"{prefix}_scale", scale.reshape(view).clone())
            gm.register_buffer(f"{prefix}_shift", shift.reshape(view).clone())
            with gm.graph.inserting_before(node):
                s = gm.graph.get_attr(f"{prefix}_scale")
                t = gm.graph.get_attr(f"{prefix}_shift")
                fused = gm.graph.call_function(torch.add, (
                    gm.graph.call_function(torch.mul, (layer, s)), t))
            node.replace_all_uses_with(fused)
        gm.graph.erase_node(node)
    return gm


def _fold_into_float_layer(gm: torch.fx.GraphModule, layer: torch.fx.Node, scale: torch.Tensor,
                           shift: torch.Tensor, calls: Counter[str]) -> bool:
    """Scale a float layer's own weight and bias; False if its weight is quantized, or if its
    module is called elsewhere too (its other calls must keep the unscaled weight)."""
    if layer.op != "call_module" or calls[str(layer.target)] != 1:
        return False
    module = gm.get_submodule(str(layer.target))
    with torch.no_grad():
        view = (-1,) + (1,) * (module.weight.dim() - 1)
        module.weight.mul_(scale.reshape(view))
        bias = module.bias if module.bias is not None else torch.zeros_like(shift)
        module.bias = nn.Parameter(bias * scale + shift, requires_grad=module.weight.requires_grad)
    return True
