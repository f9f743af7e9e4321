"""The torchvision classification zoo through fxquant, step by step, each model in its own process.

For every model of ``torchvision.models.list_models(module=torchvision.models)`` (small inputs;
models over 150M parameters skipped with the reason) and a recipe (``bnn`` by default, ``twn``,
``dorefa``) it runs the steps of :data:`STEPS`, each an independent check against the float model:

* ``prepare``: ``fxquant.prepare``; on a :class:`fxquant.TracingError` the advice it prints
  (``leaf_modules=[...]``, ``leaf_functions=[...]``) is applied and prepare rerun, up to 10 times;
  the rows name what the advice added (a TracingError without usable advice is a failure);
* ``state_dict``: the prepared model's ``state_dict`` keys are the float model's, and
  ``prepared.load_state_dict(float.state_dict(), strict=True)`` works;
* ``eval_equal``: with every quantizer disabled, ``prepared.eval()(x)`` equals ``float.eval()(x)``
  bit for bit, and ``prepared.train()(x)`` equals ``float.train()(x)`` under the same RNG seed;
* ``train_step``: one cross-entropy forward/backward in train mode gives a finite loss and a
  finite, non-zero gradient for every latent weight (every weight read by a weight quantizer);
* ``coverage``: every weight of an ``nn.Linear``/``nn.Conv*`` (subclasses included) and every
  ``nn.MultiheadAttention`` projection feeds a weight quantizer, except the layers the recipe
  leaves in float (first/last) and modules made leaves by TracingError advice;
* ``convert``: ``convert(prepared)(x)`` equals ``prepared.eval()(x)`` (exactly without batch norm
  folding, <= 1e-5 relative with it; batch norms carry realistic random statistics, see
  :func:`randomize_bn`), and two calls of the converted model are equal;
* ``inspect``: ``fxquant.summary`` and ``fxquant.to_networkx`` of the prepared and converted model;
* ``save_load``: ``fxquant.save`` / ``fxquant.load`` (into a fresh float instance) of the prepared
  and the converted model reproduce their outputs exactly;
* ``export``: ``torch.export.export`` of the converted model; its module's output equals it.

Each row of ``benchmarks/results/zoo.json`` is ``{model, recipe, step, status, error,
max_rel_diff, seconds}`` with status pass / fail / blocked (an earlier step it needs failed) /
skip / timeout / crash. ``tests/test_zoo.py`` runs a few models with these same functions.

    python -m benchmarks.zoo [--recipe bnn|twn|dorefa] [--models resnet18,vit_b_16|--subset]
                             [--workers 2] [--timeout 900] [--out NAME]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import fnmatch
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves

import fxquant
from benchmarks.common import RESULTS, ROOT, write
from benchmarks.tv import import_torchvision
from fxquant import training
from fxquant.graph.attention import composite_attention
from fxquant.graph.meta import get_record

RECIPES: dict[str, Callable[[], fxquant.Recipe]] = {
    "bnn": fxquant.Recipe.bnn, "twn": fxquant.Recipe.twn, "dorefa": fxquant.Recipe.dorefa,
    # the one-call fix for ReLU networks: each sign reads the value before the relu, which moves
    # after the binary layer's batch norm (Bi-Real/ReActNet placement)
    "bnn-move": lambda: fxquant.Recipe.bnn().with_nonnegative_inputs("move")}
MAX_PARAMS = 150_000_000
BATCH = 2
# Smallest sensible inputs: 64x64 works for every convnet except inception_v3, whose train-mode
# aux head needs 17x17 after Mixed_6e (its 299x299 input).
# ViTs take image_size as a constructor argument (32 -> 2x2 patches of 16); maxvit_t's partition
# size (7) is fixed, so it needs its 224x224 input.
IMAGE_SIZE = {"inception_v3": 299, "maxvit_t": 224, "vit_*": 32}
MODEL_KWARGS: dict[str, dict[str, Any]] = {"vit_*": {"image_size": 32}}
# Scaled-down instances of torchvision's transformer classes (same code, a few small layers), for
# tests that must run in seconds; they are not in list_models, so only --models names them.
TINY: dict[str, tuple[str, dict[str, Any], int]] = {
    "vit_tiny": ("vision_transformer.VisionTransformer", dict(
        image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
        dropout=0.1, attention_dropout=0.1), 32),
    "swin_tiny": ("swin_transformer.SwinTransformer", dict(
        patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4],
        stochastic_depth_prob=0.2, dropout=0.1), 32),
    "swin_v2_tiny": ("swin_transformer.SwinTransformer", dict(
        patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4],
        stochastic_depth_prob=0.2, block="SwinTransformerBlockV2",
        downsample_layer="PatchMergingV2"), 32),
    "maxvit_tiny": ("maxvit.MaxVit", dict(
        input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[8, 16],
        block_layers=[1, 1], head_dim=4, stochastic_depth_prob=0.2), 32),
}
# A handful of structurally different models that run in seconds (tests/test_zoo.py):
# multi-head attention (ViT), shifted-window attention with stochastic depth (Swin), depthwise
# convs + squeeze-excitation + hardswish + a dropout head (MobileNetV3), in-place ReLUs feeding
# residual adds (ResNet-18).
SUBSET = ("vit_tiny", "swin_tiny", "mobilenet_v3_small", "resnet18")
ADVICE = re.compile(r"(leaf_modules|leaf_functions)=\[([^\]]*)\]")
REL_TOL_BN_FOLD = 1e-5


def _lookup(table: dict[str, Any], name: str, default: Any) -> Any:
    for pattern, value in table.items():
        if fnmatch.fnmatch(name, pattern):
            return value
    return default


def reset_zero_weights(model: nn.Module) -> list[str]:
    """Re-initialise Linear/Conv layers whose weight is all zero (ViT's head is zero-initialised,
    which makes every gradient above it zero); return their paths."""
    paths = []
    for path, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and not m.weight.any():
            m.reset_parameters()
            paths.append(path)
    return paths


def randomize_bn(model: nn.Module, seed: int = 7) -> None:
    """'Trained-looking' batch-norm statistics and affine parameters (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.1)


def model_names() -> list[str]:
    return import_torchvision().models.list_models(module=import_torchvision().models)


def skip_reason(name: str) -> str | None:
    """Why ``name`` is skipped (over :data:`MAX_PARAMS` parameters), else None."""
    if name in TINY:
        return None
    weights = import_torchvision().models.get_model_weights(name)
    n = max(w.meta["num_params"] for w in weights)
    if n > MAX_PARAMS:
        return f"{n / 1e6:.0f}M parameters > {MAX_PARAMS / 1e6:.0f}M"
    return None


def build_float(name: str, seed: int = 0) -> nn.Module:
    """The torchvision model ``name`` with random weights and realistic batch-norm statistics."""
    torch.manual_seed(seed)
    models = import_torchvision().models
    if name in TINY:
        where, kwargs, _ = TINY[name]
        module, cls = where.split(".")
        kwargs = {k: getattr(getattr(models, module), v) if k in ("block", "downsample_layer")
                  else v for k, v in kwargs.items()}
        model = getattr(getattr(models, module), cls)(**kwargs)
    else:
        model = models.get_model(name, weights=None, **_lookup(MODEL_KWARGS, name, {}))
    reset_zero_weights(model)
    randomize_bn(model)
    return model


def _resolve(dotted: str) -> Any:
    """The class or function named ``package.module.name`` (or ``module.Outer.Inner``)."""
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ValueError(f"cannot import {dotted!r}")


def advised_leaves(message: str) -> dict[str, list[Any]]:
    """The first concrete ``leaf_modules=[...]`` and ``leaf_functions=[...]`` a TracingError
    message advises: module paths (``'features.3'``), classes (``torchvision.ops.misc.Permute``)
    and functions (``torchvision.ops.stochastic_depth``); ``{}`` when none."""
    advice: dict[str, list[Any]] = {}
    for match in ADVICE.finditer(message):
        items = [item.strip() for item in match.group(2).split(",") if item.strip()]
        if items and "..." not in items and match.group(1) not in advice:
            advice[match.group(1)] = [item.strip("'\"") if item[0] in "'\"" else _resolve(item)
                                      for item in items]
    return advice


def leaf_names(leaves: list[Any]) -> list[str]:
    return [x if isinstance(x, str) else f"{x.__module__}.{x.__qualname__}" for x in leaves]


@dataclasses.dataclass
class Case:
    """One model under one recipe: the float model, its input, and what the steps produced."""

    name: str
    recipe: str
    float_model: nn.Module
    x: torch.Tensor
    target: torch.Tensor
    leaf_modules: list[str | type[nn.Module]] = dataclasses.field(default_factory=list)
    leaf_functions: list[Callable[..., Any]] = dataclasses.field(default_factory=list)
    prepared: torch.fx.GraphModule | None = None
    converted: torch.fx.GraphModule | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)  # prepare's

    def prepare(self) -> torch.fx.GraphModule:
        """The prepared model, following TracingError advice (``leaf_modules``,
        ``leaf_functions``) when given, up to 10 times."""
        for _ in range(10):
            if self.prepared is not None:
                break
            extra = {"leaf_functions": self.leaf_functions} if self.leaf_functions else {}
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    self.prepared = fxquant.prepare(self.float_model, RECIPES[self.recipe](),
                                                    leaf_modules=self.leaf_modules, **extra)
                self.warnings = [str(w.message) for w in caught]
            except fxquant.TracingError as err:
                advice = advised_leaves(str(err))
                new_modules = [x for x in advice.get("leaf_modules", [])
                               if x not in self.leaf_modules]
                new_functions = [x for x in advice.get("leaf_functions", [])
                                 if x not in self.leaf_functions]
                if not new_modules and not new_functions:
                    raise
                self.leaf_modules += new_modules
                self.leaf_functions += new_functions
        if self.prepared is None:
            raise RuntimeError(f"{self.name}: prepare still fails after applying the advice of "
                               f"10 TracingErrors")
        return self.prepared

    def convert(self) -> torch.fx.GraphModule:
        if self.converted is None:
            self.converted = fxquant.convert(self.prepare())
        return self.converted


def make_case(name: str, recipe: str = "bnn", size: int | None = None) -> Case:
    """``name`` with a batch of 2 random images (of :data:`IMAGE_SIZE` unless ``size`` is given)."""
    size = size or (TINY[name][2] if name in TINY else _lookup(IMAGE_SIZE, name, 64))
    g = torch.Generator().manual_seed(42)
    x = torch.randn(BATCH, 3, size, size, generator=g)
    target = torch.randint(0, 1000, (BATCH,), generator=g)
    return Case(name, recipe, build_float(name), x, target)


class Mismatch(AssertionError):
    """A numerical check failed; ``max_rel_diff`` is what was measured."""

    def __init__(self, message: str, max_rel_diff: float) -> None:
        super().__init__(f"{message} (max rel diff {max_rel_diff:.3g})")
        self.max_rel_diff = max_rel_diff


def max_rel_diff(a: Any, b: Any) -> float:
    """max |a - b| / max |b| over the tensors of two (nested) outputs; inf if shapes differ."""
    la, lb = tree_leaves(a), tree_leaves(b)
    if len(la) != len(lb) or any(x.shape != y.shape for x, y in zip(la, lb, strict=True)):
        return float("inf")
    worst = 0.0
    for x, y in zip(la, lb, strict=True):
        x, y = x.detach().double(), y.detach().double()
        if torch.equal(x, y):
            continue
        scale = y.abs().max().item() or 1.0
        worst = max(worst, (x - y).abs().max().item() / scale)
    return worst if worst == worst else float("inf")   # NaN -> inf


def _structure(out: Any) -> str:
    return f"{type(out).__name__} of {len(tree_leaves(out))} tensor(s)"


def assert_close(got: Any, want: Any, what: str, tol: float = 0.0) -> float:
    """Raise :class:`Mismatch` unless ``got`` equals ``want`` (bit for bit when ``tol`` is 0)."""
    la, lb = tree_leaves(got), tree_leaves(want)
    if len(la) != len(lb) or any(x.shape != y.shape for x, y in zip(la, lb, strict=True)):
        raise Mismatch(f"{what}: got {_structure(got)} {[tuple(t.shape) for t in la]}, "
                       f"want {_structure(want)} {[tuple(t.shape) for t in lb]}", float("inf"))
    exact = all(torch.equal(x, y) for x, y in zip(la, lb, strict=True))
    diff = 0.0 if exact else max_rel_diff(got, want)
    if not exact and (tol == 0.0 or not diff <= tol):
        raise Mismatch(f"{what}: outputs differ" + (f" beyond {tol:g}" if tol else ""), diff)
    return diff


@contextlib.contextmanager
def _restored(*modules: nn.Module) -> Iterator[None]:
    """Restore the state (parameters, buffers), train flags and grads of ``modules`` afterwards."""
    saved = [({k: v.clone() for k, v in m.state_dict(keep_vars=False).items()},
              {n: s.training for n, s in m.named_modules()}) for m in modules]
    try:
        yield
    finally:
        for m, (state, flags) in zip(modules, saved, strict=True):
            with torch.no_grad():
                for k, v in m.state_dict(keep_vars=True).items():
                    if k in state:
                        v.copy_(state[k])
            for n, s in m.named_modules():
                s.training = flags.get(n, s.training)
            m.zero_grad(set_to_none=True)


def _loss(out: Any, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over every logits tensor of the output (aux heads included)."""
    return sum(F.cross_entropy(t, target) for t in tree_leaves(out))


# ---- the steps: each takes a Case and returns (max_rel_diff or None, note) or raises ----

Result = tuple[float | None, str]


def step_prepare(case: Case) -> Result:
    case.prepare()
    n = len(training.quantizers(case.prepared))
    note = f"{n} quantizers"
    if case.leaf_modules or case.leaf_functions:
        note += (f"; TracingError advice applied: leaf_modules={leaf_names(case.leaf_modules)}"
                 f" leaf_functions={leaf_names(case.leaf_functions)}")
    return None, note


def step_state_dict(case: Case) -> Result:
    p, f = case.prepare(), case.float_model
    got, want = list(p.state_dict()), list(f.state_dict())
    if set(got) != set(want):
        extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
        raise AssertionError(f"state_dict keys differ from the float model's: extra {extra[:5]} "
                             f"({len(extra)}), missing {missing[:5]} ({len(missing)})")
    with _restored(p):
        p.load_state_dict(f.state_dict(), strict=True)
    return None, "" if got == want else "same keys, different order"


def _set_enabled(p: torch.fx.GraphModule, enabled: bool) -> None:
    if training.quantizers(p):
        training.set_quantizers_enabled(p, enabled)


def step_eval_equal(case: Case) -> Result:
    """Quantizers disabled: eval equals the float model's eval (under no_grad, with torch's fused
    attention kernel off; its difference is noted) and train equals train under one seed."""
    p, f = case.prepare(), case.float_model
    note = ""
    with _restored(p, f), torch.no_grad():
        _set_enabled(p, False)
        try:
            got = p.eval()(case.x)
            with composite_attention():
                assert_close(got, f.eval()(case.x), "eval, quantizers disabled")
            fused = max_rel_diff(got, f(case.x))
            if fused:
                note = f"torch's fused attention kernel differs by {fused:.2g} relative"
            torch.manual_seed(1)
            got = p.train()(case.x)
            torch.manual_seed(1)
            assert_close(got, f.train()(case.x), "train (same seed), quantizers disabled")
        finally:
            _set_enabled(p, True)
    return 0.0, note


def step_train_step(case: Case, tries: int = 5) -> Result:
    """Loss and latent-weight gradients of one train-mode step. A weight whose gradient is zero is
    tried again with up to ``tries - 1`` more seeds, gradients summed: stochastic depth (batch of
    2) may drop a whole residual branch in one step."""
    p = case.prepare()
    latents = training.latent_weights(p, bits=None)
    if not latents:
        raise AssertionError("no latent weights (no weight quantizer)")
    with _restored(p):
        p.train()
        for seed in range(1, tries + 1):
            torch.manual_seed(seed)
            loss = _loss(p(case.x), case.target)
            if not torch.isfinite(loss):
                raise AssertionError(f"loss is {loss.item()} (seed {seed})")
            loss.backward()
            if seed == 1:
                first = loss.item()
                none = [n for n, w in latents.items() if w.grad is None]
                bad = [n for n, w in latents.items() if w.grad is not None
                       and not torch.isfinite(w.grad).all()]
            zero = [n for n, w in latents.items() if w.grad is not None
                    and not w.grad.count_nonzero()]
            if none or bad or not zero:
                break
    if none or bad or zero:
        warned = any("non-negative value" in w for w in case.warnings)
        raise AssertionError(f"of {len(latents)} latent weights: no grad {len(none)} {none[:3]}, "
                             f"non-finite grad {len(bad)} {bad[:3]}, zero grad {len(zero)} "
                             f"{zero[:3]} (loss {first:.4g}; {seed} step(s))"
                             + ("; prepare warned: binary layers read non-negative values (r5)"
                                if warned else ""))
    return None, f"{len(latents)} latent weights, loss {first:.4g}, {seed} step(s)"


def _expected_weights(model: nn.Module) -> dict[str, str]:
    """Weight parameter name -> module type, for every Linear/Conv and MHA projection."""
    out = {}
    for path, m in model.named_modules():
        pre = f"{path}." if path else ""
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            out[pre + "weight"] = type(m).__name__
        elif isinstance(m, nn.MultiheadAttention):
            for attr in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                if getattr(m, attr, None) is not None:
                    out[pre + attr] = "MultiheadAttention"
    return out


def step_coverage(case: Case) -> Result:
    p = case.prepare()
    covered = set(training.latent_weights(p, bits=None))
    float_by_recipe = set()
    for node in p.graph.nodes:
        rec = get_record(node)
        if rec is not None and rec.role == "layer" and rec.spec("weight") is None:
            float_by_recipe.add(f"{rec.module}.weight" if rec.module else "weight")
    classes = tuple(x for x in case.leaf_modules if isinstance(x, type))
    leaves = tuple(f"{x}." for x in case.leaf_modules if isinstance(x, str))
    leaves += tuple(f"{path}." for path, m in case.float_model.named_modules()
                    if classes and isinstance(m, classes))
    missing = {n: t for n, t in _expected_weights(case.float_model).items()
               if n not in covered and n not in float_by_recipe and not n.startswith(leaves)}
    # left float but named in prepare's warning (e.g. weights passed to an fx-wrapped function):
    # not silent, so not a failure; counted in the note
    reported = "\n".join(w for w in case.warnings if "stay in float" in w)
    told = {n for n in missing if f"  {n.rpartition('.')[0]} (" in reported}
    silent = {n: t for n, t in missing.items() if n not in told}
    if silent:
        kinds = sorted(set(silent.values()))
        raise AssertionError(f"{len(silent)} weights feed no weight quantizer and prepare did "
                             f"not say so ({', '.join(kinds)}): {sorted(silent)[:4]}")
    note = f"{len(covered)} quantized weights, {len(float_by_recipe)} float by recipe"
    return None, note + (f", {len(told)} float and reported by prepare" if told else "")


def _batch_norms(gm: torch.fx.GraphModule) -> int:
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(
                gm.get_submodule(node.target), nn.modules.batchnorm._BatchNorm):
            count += 1
        elif node.op == "call_function" and node.target in (F.batch_norm, torch.batch_norm):
            count += 1
    return count


def step_convert(case: Case) -> Result:
    p = case.prepare()
    with _restored(p), torch.no_grad():
        want = p.eval()(case.x)
        c = case.convert()
        c.graph.lint()
        got = c(case.x)
        assert_close(c(case.x), got, "converted model called twice")
        folded = _batch_norms(p) - _batch_norms(c)
        tol = REL_TOL_BN_FOLD if folded else 0.0
        diff = assert_close(got, want, f"convert vs prepared.eval() ({folded} BN folded)", tol)
    return diff, f"{folded} batch norms folded"


def step_inspect(case: Case) -> Result:
    sizes = []
    for gm in (case.prepare(), case.convert()):
        text = fxquant.summary(gm)
        graph = fxquant.to_networkx(gm)
        if not isinstance(text, str) or graph.number_of_nodes() != len(gm.graph.nodes):
            raise AssertionError(f"summary/to_networkx: {type(text).__name__}, "
                                 f"{graph.number_of_nodes()} vs {len(gm.graph.nodes)} nodes")
        sizes.append(graph.number_of_nodes())
    return None, f"nodes prepared/converted {sizes[0]}/{sizes[1]}"


def _scrambled_copy(model: nn.Module) -> nn.Module:
    """A float instance whose floating-point parameters and buffers all hold 0.5 (as good as a
    freshly built one for load(), whose job is to restore every value; and much cheaper)."""
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for t in [*fresh.parameters(), *fresh.buffers()]:
            if t.is_floating_point():
                t.fill_(0.5)
    return fresh


def step_save_load(case: Case) -> Result:
    p, c = case.prepare(), case.convert()
    with _restored(p), torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        for what, gm in (("prepared", p), ("converted", c)):
            path = os.path.join(tmp, f"{what}.fxq")
            fxquant.save(gm, path)
            loaded = fxquant.load(path, _scrambled_copy(case.float_model))
            assert_close(loaded.eval()(case.x), gm.eval()(case.x), f"loaded {what} vs saved")
    return 0.0, ""


def step_export(case: Case) -> Result:
    c = case.convert()
    with torch.no_grad():
        program = torch.export.export(c, (case.x,))
        diff = assert_close(program.module()(case.x), c(case.x), "exported vs converted")
    return diff, ""


STEPS: dict[str, Callable[[Case], Result]] = {
    "prepare": step_prepare, "state_dict": step_state_dict, "eval_equal": step_eval_equal,
    "train_step": step_train_step, "coverage": step_coverage, "convert": step_convert,
    "inspect": step_inspect, "save_load": step_save_load, "export": step_export}
NEEDS = {"inspect": "convert", "save_load": "convert", "export": "convert"}


def _short(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    return text if len(text) <= 600 else text[:600] + " ..."


def run_model(name: str, recipe: str, steps: list[str] | None = None) -> list[dict[str, Any]]:
    """Run ``steps`` (all by default) on one model in this process; one row per step."""
    rows: list[dict[str, Any]] = []

    def row(step: str, status: str, error: str = "", diff: float | None = None,
            seconds: float = 0.0, note: str = "") -> None:
        rows.append({"model": name, "recipe": recipe, "step": step, "status": status,
                     "error": error, "max_rel_diff": diff, "seconds": round(seconds, 3),
                     "note": note})

    steps = list(STEPS) if steps is None else steps
    reason = skip_reason(name)
    if reason:
        for step in steps:
            row(step, "skip", reason)
        return rows
    start = time.perf_counter()
    case = make_case(name, recipe)
    build = time.perf_counter() - start
    failed: dict[str, str] = {}
    for step in steps:
        need = "prepare" if step != "prepare" else None
        need = NEEDS.get(step, need)
        blocker = failed.get("prepare") or (failed.get(need) if need else None)
        if blocker:
            row(step, "blocked", blocker)
            continue
        start = time.perf_counter()
        try:
            diff, note = STEPS[step](case)
            row(step, "pass", "", diff, time.perf_counter() - start, note)
        except Exception as err:  # noqa: BLE001 (every failure is a result)
            failed[step] = f"{step} failed"
            diff = getattr(err, "max_rel_diff", None)
            where = traceback.extract_tb(err.__traceback__)[-1]
            row(step, "fail", _short(err), diff, time.perf_counter() - start,
                f"raised at {os.path.relpath(where.filename, ROOT)}:{where.lineno}")
            if step == "convert" and case.converted is None:
                failed["convert"] = "convert failed"
    rows[0]["seconds"] += round(build, 3)
    if case.leaf_modules or case.leaf_functions:
        for r in rows:
            r["advice"] = {"leaf_modules": leaf_names(case.leaf_modules),
                           "leaf_functions": leaf_names(case.leaf_functions)}
    return rows


def _worker(name: str, recipe: str, steps: list[str] | None) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    print("ZOO-ROWS " + json.dumps(run_model(name, recipe, steps)), flush=True)


def run_isolated(name: str, recipe: str, timeout: float,
                 steps: list[str] | None = None) -> list[dict[str, Any]]:
    """:func:`run_model` in a fresh subprocess; a timeout or crash becomes a row."""
    cmd = [sys.executable, "-m", "benchmarks.zoo", "--worker", name, "--recipe", recipe]
    if steps:
        cmd += ["--steps", ",".join(steps)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [{"model": name, "recipe": recipe, "step": "process", "status": "timeout",
                 "error": f"over {timeout:.0f} s", "max_rel_diff": None,
                 "seconds": round(time.perf_counter() - start, 1), "note": ""}]
    for line in proc.stdout.splitlines():
        if line.startswith("ZOO-ROWS "):
            return json.loads(line[len("ZOO-ROWS "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return [{"model": name, "recipe": recipe, "step": "process", "status": "crash",
             "error": f"exit {proc.returncode}: {' | '.join(tail)}"[:600], "max_rel_diff": None,
             "seconds": round(time.perf_counter() - start, 1), "note": ""}]


def table(rows: list[dict[str, Any]]) -> str:
    """Counts of each status per step."""
    from tabulate import tabulate

    statuses = ["pass", "fail", "blocked", "skip", "timeout", "crash"]
    steps = [s for s in [*STEPS, "process"] if any(r["step"] == s for r in rows)]
    body = [[s] + [sum(r["step"] == s and r["status"] == st for r in rows) for st in statuses]
            for s in steps]
    return tabulate(body, headers=["step", *statuses])


def _merge(earlier: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``earlier`` rows with those of the models in ``new`` replaced (a partial rerun)."""
    rerun = {(r["model"], r["recipe"]) for r in new}
    return [r for r in earlier if (r["model"], r["recipe"]) not in rerun] + new


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="bnn", choices=sorted(RECIPES))
    ap.add_argument("--models", default="", help="comma-separated names or globs (default: all)")
    ap.add_argument("--subset", action="store_true", help=f"only {', '.join(SUBSET)}")
    ap.add_argument("--steps", default="", help="comma-separated steps (default: all)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per model")
    ap.add_argument("--out", default="", help="results name (default zoo, or zoo_<recipe>)")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    steps = [s for s in args.steps.split(",") if s] or None
    if steps and (bad := sorted(set(steps) - set(STEPS))):
        ap.error(f"unknown steps {bad}; choose from {list(STEPS)}")
    if args.worker:
        _worker(args.worker, args.recipe, steps)
        return
    names = model_names()
    if args.subset:
        names = list(SUBSET)
    elif args.models:
        pats = [p for p in args.models.split(",") if p]
        names = [n for n in [*names, *TINY] if any(fnmatch.fnmatch(n, p) for p in pats)]
    if not names:
        ap.error("no torchvision model matches --models")
    out = args.out or ("zoo" if args.recipe == "bnn" else f"zoo_{args.recipe}")
    earlier: list[dict[str, Any]] = []
    if (args.models or args.subset) and (RESULTS / f"{out}.json").exists():
        earlier = json.loads((RESULTS / f"{out}.json").read_text())["rows"]
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, min(args.workers, 2))) as pool:
        futures = {n: pool.submit(run_isolated, n, args.recipe, args.timeout, steps)
                   for n in names}
        for n in names:
            got = futures[n].result()
            rows += got
            bad = [f"{r['step']}:{r['status']}" for r in got if r["status"] != "pass"]
            secs = sum(r["seconds"] for r in got)
            print(f"{n:24s} {secs:7.1f}s  {' '.join(bad) or 'all pass'}", flush=True)
            done = n == names[-1]
            path = write(out, {"recipe": args.recipe, "steps": list(STEPS), "complete": done,
                               "wall_s": round(time.perf_counter() - start, 1),  # after each model
                               "rows": _merge(earlier, rows)})
    print(table(rows))
    if earlier:
        print(f"merged with the earlier rows of {out}.json; all rows:\n"
              f"{table(_merge(earlier, rows))}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
