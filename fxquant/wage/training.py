"""Training a prepared WAGE model: initialisation, seeded rounding and the WAGE update rule.

QPyTorch's WAGE example (``examples/WAGE/utils.py::train_epoch``) keeps a float accumulator per
weight, sets ``param.data = QW(acc, scale)`` before every forward, and after the backward pass
updates ``acc <- C(acc, bits_W) - QG(grad, bits_G, lr)``. In a model prepared with
:meth:`fxquant.Recipe.wage`, the latent weight parameter **is** the accumulator: the graph's
:class:`~fxquant.wage.WAGEWeight` quantizer computes ``QW(acc, scale)`` in every forward and passes
the gradient straight through, so the parameter receives exactly the gradient QPyTorch takes at the
quantized weight. What remains is:

* :func:`initialize`: ``wage_init_`` every latent weight and give its quantizer the layer scale;
* :class:`WAGEOptimizer`: a ``torch.optim.Optimizer`` applying the update rule (schedulers work on
  ``param_group["lr"]``, QPyTorch's lr 8 / 1 / 1/8 included);
* :func:`seed_rounding`: one seeded generator per WAGE quantizer, for reproducible stochastic
  rounding of activations and errors.

>>> import torch, torch.nn as nn, fxquant
>>> model = nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 2, bias=False))
>>> prepared = fxquant.prepare(model, fxquant.Recipe.wage(bits_W=2, bits_A=8, bits_E=8))
>>> initialize(prepared, generator=torch.Generator().manual_seed(0))
{'0': 1.0, '2': 1.0}
>>> opt = WAGEOptimizer(prepared, lr=8.0, bits_G=8, grad_mode="nearest")
>>> loss = prepared(torch.randn(3, 4)).square().sum()
>>> loss.backward(); opt.step()
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx
from torch import nn

from fxquant._distributed import is_dtensor, world_size
from fxquant.graph.meta import get_record
from fxquant.graph.module import all_nodes
from fxquant.quantizers.fixed_point import ROUNDING_MODES
from fxquant.wage.functional import QG
from fxquant.wage.init import wage_init_
from fxquant.wage.quantizer import WAGEError, WAGEQuantizer, WAGEWeight

__all__ = ["wage_weights", "initialize", "seed_rounding", "WAGEOptimizer"]


def wage_weights(prepared: torch.fx.GraphModule
                 ) -> list[tuple[str, nn.Parameter, list[WAGEWeight]]]:
    """``(layer, latent weight, its WAGEWeight quantizers)`` for each WAGE weight, graph order.

    Found through the ``QuantRecord`` of every weight-quantizer node whose module is a
    :class:`~fxquant.wage.WAGEWeight`; the latent weight is the node's input, which must be a
    parameter (``get_attr``). A weight used by several layer calls appears once, with all its
    quantizers. Raises ``ValueError`` naming the layer when the input is not a parameter.
    """
    found: dict[int, tuple[str, nn.Parameter, list[WAGEWeight]]] = {}
    for node in all_nodes(prepared):
        record = get_record(node)
        if record is None or record.role != "weight_quantizer" or node.op != "call_module":
            continue
        quantizer = prepared.get_submodule(str(node.target))
        if not isinstance(quantizer, WAGEWeight):
            continue
        arg = node.args[0]
        param = None
        if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
            try:
                param = prepared.get_parameter(str(arg.target))
            except AttributeError:
                param = None
        if param is None:
            raise ValueError(f"layer {record.layer!r}: the input of its WAGE weight quantizer "
                             f"{node.target!r} is not a parameter, so it cannot hold the WAGE "
                             "accumulator")
        if id(param) in found:
            found[id(param)][2].append(quantizer)
        else:
            found[id(param)] = (record.layer, param, [quantizer])
    return list(found.values())


def _require_wage(prepared: torch.fx.GraphModule, who: str
                  ) -> list[tuple[str, nn.Parameter, list[WAGEWeight]]]:
    if not isinstance(prepared, torch.fx.GraphModule):
        raise TypeError(f"{who}: expected a model returned by fxquant.prepare, got "
                        f"{type(prepared).__name__}")
    weights = wage_weights(prepared)
    if not weights:
        raise ValueError(f"{who}: the model has no WAGEWeight quantizer; prepare it with "
                         "fxquant.Recipe.wage() (or a recipe whose weight slot is 'wage_weight')")
    return weights


def initialize(
    prepared: torch.fx.GraphModule,
    factor: float = 1.0,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """WAGE-initialise a prepared model in place; return ``{layer: scale}``.

    For every latent weight under a :class:`~fxquant.wage.WAGEWeight` quantizer, in graph order:
    ``wage_init_(weight, bits_W=quantizer.bits, factor)`` draws ``U(-L, L)`` with
    ``L = max(1.5 / 2**(bits_W - 1), sqrt(3 * factor / fan_in))`` from ``generator`` (on the
    weights' device; ``None``: torch's global generator), and the returned power-of-two scale
    is written to ``quantizer.scale`` (``QW`` divides by it when ``> 1.8``) and to
    ``weight.weight_scale``. ``factor=1.0`` is QPyTorch's VGG7LP (so for
    ``bits_W=2``: scale 2 for fan_in 27, 16 for 1152, 32 for 4608).

    Only WAGE weights are touched: biases, batch-norm parameters and float layers keep their
    values (QPyTorch's VGG has none; build layers with ``bias=False`` to match it). A weight
    shared by several quantizers is drawn once; they must agree on ``bits``. Raises
    ``ValueError`` when the model has no WAGE weight.
    """
    result: dict[str, float] = {}
    for layer, param, quantizers in _require_wage(prepared, "initialize"):
        bits = {q.bits for q in quantizers}
        if len(bits) > 1:
            raise ValueError(f"initialize: layer {layer!r} has WAGE weight quantizers with "
                             f"different bits {sorted(bits)}; give them the same bits_W")
        scale = float(wage_init_(param, bits.pop(), factor=factor, generator=generator))
        for q in quantizers:
            q.scale = scale
        result[layer] = scale
    return result


def seed_rounding(
    prepared: torch.fx.GraphModule,
    seed: int,
    device: torch.device | str | None = None,
) -> dict[str, torch.Generator]:
    """Give every WAGE quantizer module of ``prepared`` its own seeded ``torch.Generator``.

    A recipe deep-copies one quantizer instance per layer, so copies of a seeded generator would
    all draw the same noise sequence. This replaces them: the generators are created on
    ``device`` (default: that of the model's first parameter, CPU if none), seeded from a master
    ``torch.Generator().manual_seed(seed)`` one after the other in module registration order.
    Returns ``{module name: generator}``. Only stochastic rounding draws from them; the WAGE
    optimizer has its own ``generator``.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed_rounding: seed must be an int, got {seed!r}")
    if device is None:
        first = next(prepared.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    master = torch.Generator().manual_seed(seed)
    generators: dict[str, torch.Generator] = {}
    for name, module in prepared.named_modules():
        if isinstance(module, (WAGEQuantizer, WAGEError, WAGEWeight)):
            sub_seed = int(torch.randint(0, 2**62, (), generator=master))
            module.generator = torch.Generator(device=device).manual_seed(sub_seed)
            generators[name] = module.generator
    return generators


def _check_group(group: dict[str, Any]) -> None:
    lr, bits_W, bits_G, mode = group["lr"], group["bits_W"], group["bits_G"], group["grad_mode"]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"WAGEOptimizer: lr must be a finite number >= 0, got {lr!r}")
    if bits_W is not None and (isinstance(bits_W, bool) or not isinstance(bits_W, int)
                               or bits_W < 1):
        raise ValueError(f"WAGEOptimizer: bits_W must be an int >= 1 or None, got {bits_W!r}")
    if isinstance(bits_G, bool) or not isinstance(bits_G, int) or bits_G < 2:
        raise ValueError(f"WAGEOptimizer: bits_G must be an int >= 2, got {bits_G!r}")
    if mode not in ROUNDING_MODES:
        raise ValueError(f"WAGEOptimizer: grad_mode must be one of {ROUNDING_MODES}, "
                         f"got {mode!r}")


def _clip_bounds(bits: int) -> tuple[float, float]:
    """The bounds of ``fxquant.wage.C(x, bits)``."""
    delta = 0.0 if bits > 15 or bits == 1 else 2.0 ** -(bits - 1)
    return -1.0 + delta, 1.0 - delta


def _groups_from_model(prepared: torch.fx.GraphModule, bits_W: int | None
                       ) -> list[dict[str, Any]]:
    by_bits: dict[int, list[nn.Parameter]] = {}
    wage_ids = set()
    for layer, param, quantizers in _require_wage(prepared, "WAGEOptimizer"):
        bits = {q.bits for q in quantizers}
        if len(bits) > 1 or (bits_W is not None and bits != {bits_W}):
            raise ValueError(f"WAGEOptimizer: layer {layer!r} has WAGE weight bits "
                             f"{sorted(bits)}, but bits_W={bits_W!r}; leave bits_W=None to use "
                             "each quantizer's bits")
        by_bits.setdefault(bits.pop(), []).append(param)
        wage_ids.add(id(param))
    groups: list[dict[str, Any]] = [{"params": ps, "bits_W": b} for b, ps in by_bits.items()]
    others = [p for p in prepared.parameters() if id(p) not in wage_ids]
    if others:
        groups.append({"params": others, "bits_W": None})
    return groups


def _same_on_every_rank(generator: torch.Generator | None, groups: list[dict[str, Any]]
                        ) -> torch.Generator | None:
    """``generator`` with rank 0's state on every rank of a process group of several ranks (for
    None: a new generator seeded from rank 0's ``torch.initial_seed()``); as it is otherwise."""
    if world_size() == 1:
        return generator
    if generator is None:
        first = next((p for g in groups for p in g["params"]), None)
        device = first.device if first is not None else torch.device("cpu")
        seed = [torch.initial_seed()]
        torch.distributed.broadcast_object_list(seed, src=0)
        # not the global stream itself: a sub-seed, so rounding noise repeats no init draws
        master = torch.Generator().manual_seed(seed[0])
        sub_seed = int(torch.randint(0, 2**62, (), generator=master))
        return torch.Generator(device=device).manual_seed(sub_seed)
    state = [generator.get_state()]
    torch.distributed.broadcast_object_list(state, src=0)
    generator.set_state(state[0])
    return generator


def _update(grad: torch.Tensor, bits_G: int, lr: float, mode: str,  # noqa: N803
            generator: torch.Generator | None) -> torch.Tensor:
    """``QG(grad, ...)``; for a ``DTensor`` gradient (FSDP2) that of the whole gradient.

    ``shift`` needs the maximum of the whole gradient and stochastic rounding one draw per
    element of it, so the gradient is gathered (``full_tensor()``, a collective in the order of
    the steps), quantized whole with the same draws on every rank, and each rank keeps its own
    shard: the step of one process, exactly.
    """
    if not is_dtensor(grad):
        return QG(grad, bits_G, lr, mode, generator)
    from torch.distributed.tensor import distribute_tensor

    whole = QG(grad.full_tensor(), bits_G, lr, mode, generator)
    return distribute_tensor(whole, grad.device_mesh, grad.placements, src_data_rank=None)


class WAGEOptimizer(torch.optim.Optimizer):
    """The WAGE update rule (Wu et al., ICLR 2018; QPyTorch ``examples/WAGE``) as an optimizer.

    For every parameter ``p`` with a gradient, in each group (keys ``lr``, ``bits_W``, ``bits_G``,
    ``grad_mode``)::

        u = QG(p.grad, bits_G, lr, grad_mode)     # R(lr * shift(grad)) * 2**-(bits_G - 1)
        p <- C(p, bits_W) - u                     # WAGE weights (bits_W an int): clip, then step
        p <- p - u                                # other parameters (bits_W None): no clip

    which is QPyTorch's ``grad <- QG(grad); acc <- C(acc, bits_W) - grad`` with ``p`` as the
    accumulator (the graph's ``WAGEWeight`` applies ``QW(p, scale)`` in the next forward). With
    ``grad_mode="nearest"`` one step equals QPyTorch's bit for bit (CPU; its CUDA kernel rounds
    ties away from zero). ``lr`` is the WAGE learning rate (QPyTorch: 8, then 1, then 1/8); it
    scales the *normalised* gradient, so step sizes are multiples of ``2**-(bits_G - 1)``. A
    scheduler may change ``param_group["lr"]``; ``lr = 0`` only clips.

    ``params``: a model returned by :func:`fxquant.prepare` with a WAGE recipe, giving one group
    per ``bits_W`` of its WAGE weights (read from their ``WAGEWeight`` quantizers; an int
    ``bits_W`` must agree) and one group ``bits_W=None`` for every other parameter; or, as for any
    torch optimizer, an iterable of tensors or of group dicts, where ``bits_W`` is the default for
    groups without their own key (QPyTorch's loop, where every parameter is a weight:
    ``bits_W=2``; ``None``: unclipped QG steps).

    **Decisions where QPyTorch is silent** (its VGG has only weights): parameters that are not
    WAGE weights (biases, batch norm, float layers) take the same quantized, normalised step
    ``-QG(grad)`` without the clip, so one ``lr`` suits every parameter. ``p.grad`` is left as
    it is (QPyTorch overwrites it with ``QG(grad)``). Parameters are visited in group order
    (QPyTorch: reverse ``named_parameters`` order; this only changes which random numbers each
    one draws). No momentum or weight decay (QPyTorch has none). An all-zero gradient gives a
    zero step (QPyTorch: NaN, see :func:`fxquant.wage.QG`).

    ``generator``: the ``torch.Generator`` (on the parameters' device) for stochastic rounding;
    ``None`` draws from torch's global generator. Its state is saved in ``state_dict()`` under
    ``"generator_state"`` and restored by ``load_state_dict``, so a resumed run draws the same
    numbers.

    **Data-parallel training** (DDP, FSDP2): after the gradient all-reduce every rank holds the
    same gradients, and each must round them alike or the replicas drift apart. So when the
    optimizer is built while a ``torch.distributed`` process group of more than one rank is
    initialised, its rounding generator is made identical on every rank at construction, by
    broadcasting from rank 0: a given ``generator`` takes rank 0's generator's state (so
    seeding it on rank 0 is enough; the object stays the caller's), and ``None`` becomes a new
    generator on the parameters' device, seeded from rank 0's ``torch.initial_seed()`` (then no
    draw touches torch's global generator, whose stream may differ between ranks). Every rank
    draws the same numbers from then on, since every rank steps the same parameters in the same
    order. Constructing the optimizer is then a collective: every rank must construct it. With
    nearest rounding of the errors (``Recipe.wage(E_mode="nearest")``, the default, whose
    error quantizers synchronise their scale, see :class:`~fxquant.wage.WAGEError`), training
    with DDP on ``n`` ranks equals one process on the global batch. Under FSDP2 (``DTensor``
    parameters) each step gathers every gradient, quantizes it whole and keeps this rank's
    shard, so FSDP2 equals one process too (at the cost of one full gradient at a time).
    """

    def __init__(
        self,
        params: torch.fx.GraphModule | Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 8.0,
        *,
        bits_W: int | None = None,  # noqa: N803
        bits_G: int = 8,  # noqa: N803
        grad_mode: str = "stochastic",
        generator: torch.Generator | None = None,
    ) -> None:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"WAGEOptimizer: generator must be a torch.Generator or None, "
                             f"got {generator!r}")
        defaults = {"lr": lr, "bits_W": bits_W, "bits_G": bits_G, "grad_mode": grad_mode}
        _check_group(defaults)
        if isinstance(params, nn.Module):
            if not isinstance(params, torch.fx.GraphModule):
                raise TypeError("WAGEOptimizer: pass a model returned by fxquant.prepare, or "
                                "its parameters")
            params = _groups_from_model(params, bits_W)
        super().__init__(params, defaults)
        self.generator = _same_on_every_rank(generator, self.param_groups)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One WAGE update of every parameter that has a gradient; returns ``closure()``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            _check_group(group)  # a scheduler or a user may have changed it
            lr, bits_W = group["lr"], group["bits_W"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("WAGEOptimizer does not support sparse gradients")
                if bits_W is not None:
                    p.clamp_(*_clip_bounds(bits_W))
                if lr > 0:
                    p.sub_(_update(p.grad, group["bits_G"], lr, group["grad_mode"],
                                   self.generator))
        return loss

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.generator is not None:
            state["generator_state"] = self.generator.get_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        generator_state = state_dict.pop("generator_state", None)
        super().load_state_dict(state_dict)
        if generator_state is not None and self.generator is not None:
            self.generator.set_state(generator_state)
