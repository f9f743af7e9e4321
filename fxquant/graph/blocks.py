"""Blocks: parts of a prepared model kept as GraphModules of their own (``prepare(..., blocks=)``).

FSDP2's ``fully_shard(block)``, ``torch.utils.checkpoint`` and regional ``torch.compile`` work
on modules; a flat FX graph has none (the graph reads ``layer1.0.conv1.weight`` directly, so
FSDP's unshard hook on ``layer1.0`` never runs). So prepare traces and prepares the model flat
as always (the same graph, numbers, records and warnings) with every traced node marked by a
:class:`~fxquant.graph.meta.BlockCall`; :func:`split_blocks` then cuts each block's nodes out
into a :class:`~fxquant.graph.module.QuantGraphModule` installed at the block's path, which the
parent graph calls (its node's record has role "block"):

* a block's parameters and buffers stay where they were (same ``state_dict`` keys); the
  quantizers of its layers move into it: ``layer1_0_conv1_weight_quantizer`` becomes
  ``layer1.0.conv1_weight_quantizer``; records keep full layer paths (``"layer1.0.conv1"``);
* a node belongs to a block when the block's forward created it, a quantizer when its layer
  (weight, input) or the value it quantizes (output, error) does; what a block cannot reach
  under its own path (a parent's tensor constant) is passed in as an argument.

:func:`flat_graphs` puts the blocks' nodes back (full paths) for whoever reads the whole model
(:func:`fxquant.summary`, the training helpers through ``all_nodes``); :func:`inline_blocks`,
the first pass of convert, does so for good, so convert lowers the model prepare built.
"""

from __future__ import annotations

import copy
import difflib
import functools
import operator
import warnings
from collections.abc import Callable, Iterable

import torch
import torch.fx
from torch import nn

from fxquant._text import listing
from fxquant._user_code import user_stacklevel
from fxquant.graph.meta import BLOCK_KEY, QuantRecord, get_record, set_record, update_record
from fxquant.graph.module import (
    PRESERVED,
    QuantGraphModule,
    graft_module_tree,
    mode_graph,
    preserve,
    set_mode_graphs,
)
from fxquant.graph.tracer import _same_graph
from fxquant.quantizers.base import Quantizer

__all__ = ["block_paths", "split_blocks", "flat_graphs", "flat_view", "inline_blocks", "blocks"]

Node = torch.fx.Node
_FOLLOWERS = ("output_quantizer", "error_quantizer")  # quantize the value before them
_SERVANTS = ("layer", "weight_quantizer", "input_quantizer")  # belong where their layer is


def block_paths(model: nn.Module, blocks: Iterable[str | type[nn.Module]],
                leaf_modules: Iterable[str | type[nn.Module]] = ()) -> frozenset[str]:
    """The paths of ``model``'s submodules that ``blocks`` names (paths and/or classes), checked:
    a path must exist, a class must match a submodule, a block cannot be a leaf module, the
    model itself, or inside another block."""
    items, leaves = list(blocks), list(leaf_modules)
    bad = [x for x in items if not (isinstance(x, str)
                                    or (isinstance(x, type) and issubclass(x, nn.Module)))]
    if bad:
        raise ValueError(f"blocks takes module paths or nn.Module classes, got {bad!r}")
    modules = dict(model.named_modules())
    name = type(model).__name__
    for path in (x for x in items if isinstance(x, str)):
        if path not in modules or not path:
            close = difflib.get_close_matches(path, [p for p in modules if p], n=3)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            raise ValueError(f"blocks: {name} has no submodule {path!r}{hint}; give submodule "
                             "paths as named_modules() spells them, e.g. 'layer1.0'")
    paths = {x for x in items if isinstance(x, str)}
    for cls in (x for x in items if isinstance(x, type)):
        found = {p for p, m in modules.items() if p and isinstance(m, cls)}
        if not found:
            classes = ", ".join(sorted({type(m).__name__ for p, m in modules.items() if p}))
            raise ValueError(f"blocks: no submodule of {name} is a {cls.__name__}; its "
                             f"submodules' classes are {classes}")
        paths |= found
    leaf_types = tuple(x for x in leaves if isinstance(x, type))
    for path in sorted(paths):
        if path in leaves or isinstance(modules[path], leaf_types) or isinstance(
                modules[path], Quantizer):
            raise ValueError(f"blocks: {path!r} is also a leaf module; a block is traced and "
                             "quantized, a leaf is neither: list it in one of the two only")
        outer = next((p for p in paths if path.startswith(p + ".")), None)
        if outer is not None:
            raise ValueError(f"blocks: {path!r} is inside the block {outer!r}; blocks cannot "
                             "nest: list only one of them")
    return frozenset(paths)


# ------------------------------------------------------------------------------------------------
# cutting blocks out of the prepared flat graph


def _stamp(node: Node) -> str | None:
    """The block path the tracer was in when it created ``node`` ("" outside every block), or
    None for a node a pass made (a copy carries its original's meta under a new name)."""
    call = node.meta.get(BLOCK_KEY)
    if call is None or call.node != node.name:
        return None
    if call.call:
        raise ValueError(f"blocks: the block {call.path!r} is called more than once by the "
                         "forward; a block must be called once (list the blocks it calls "
                         "instead, or leave it out of blocks)")
    return call.path


def _block_of(path: str, paths: frozenset[str]) -> str:
    return next((p for p in paths if path == p or path.startswith(p + ".")), "")


def _owners(graph: torch.fx.Graph, paths: frozenset[str]) -> dict[Node, str]:
    """The block path each node belongs to ("" for the parent); see the module docstring."""
    nodes = list(graph.nodes)
    owner: dict[Node, str] = {}
    for node in nodes:
        record, stamp = get_record(node), _stamp(node)
        if record is not None and record.role in _SERVANTS and (record.module or record.layer):
            owner[node] = _block_of(record.module or record.layer, paths)
        elif stamp is not None:
            owner[node] = stamp
    for node in reversed(nodes):  # made by a pass for its users: weights, paddings, biases
        role = getattr(get_record(node), "role", None)
        if node not in owner and node.users and role not in _FOLLOWERS:
            users = {owner.get(user) for user in node.users}
            if len(users) == 1 and None not in users:
                owner[node] = users.pop()
    for node in nodes:  # made after a value: output and error quantizers, moved activations
        if node not in owner and node.op not in ("placeholder", "output"):
            args = {owner.get(a, "") for a in node.all_input_nodes}
            owner[node] = args.pop() if len(args) == 1 else ""
    for node, path in owner.items():  # what a block cannot reach is passed in by its parent
        if path and node.op in ("call_module", "get_attr") and _local(node, path) is None:
            owner[node] = ""
    return owner


def _moved_in(node: Node, path: str) -> bool:
    """Whether ``node`` calls a quantizer that prepare put at the root for a layer of ``path``."""
    record = get_record(node)
    return (node.op == "call_module" and not str(node.target).startswith(path + ".")
            and record is not None and record.role.endswith("_quantizer"))


def _local(node: Node, path: str) -> str | None:
    """``node``'s target as the block at ``path`` names it; None if the block cannot reach it."""
    target = str(node.target)
    if target.startswith(path + "."):
        return target[len(path) + 1:]
    if _moved_in(node, path):
        return target.removeprefix(path.replace(".", "_") + "_")
    return None


def _cut(graph: torch.fx.Graph, path: str, inside: list[Node],
         moved: dict[str, tuple[str, str]]) -> torch.fx.Graph:
    """Move the nodes ``inside`` of ``graph`` into a new graph (returned) that ``graph`` calls
    as ``call_module path``; quantizers they call are noted in ``moved`` (root name -> path,
    name in the block)."""
    members = set(inside)
    sub = torch.fx.Graph()
    env: dict[Node, Node] = {}
    inputs = list(dict.fromkeys(a for n in inside for a in n.all_input_nodes if a not in members))
    for a in inputs:
        env[a] = sub.placeholder(a.name)
    for node in inside:
        env[node] = new = sub.node_copy(node, env.__getitem__)
        new.meta.pop(BLOCK_KEY, None)
        if node.op in ("call_module", "get_attr"):
            new.target = local = _local(node, path)
            if _moved_in(node, path) and moved.setdefault(
                    str(node.target), (path, local)) != (path, local):
                raise ValueError(f"blocks: quantizer {node.target!r} is used by two blocks")
    renamed = {root: local for root, (p, local) in moved.items() if p == path}
    for new in env.values():
        record = get_record(new)
        if record is not None and record.quantizers:
            update_record(new, quantizers=tuple((s, renamed.get(q, q))
                                                for s, q in record.quantizers))
    outputs = [n for n in inside if any(u not in members for u in n.users)]
    if len(outputs) == 1:  # the block's own value (else a tuple of the values its parent reads)
        sub.output(env[outputs[0]])
    else:
        sub.output(tuple(env[n] for n in outputs))
    _replace(graph, path, inside, inputs, outputs)
    return _canonical(sub)


def _canonical(graph: torch.fx.Graph) -> torch.fx.Graph:
    """A copy of ``graph`` whose nodes are named as tracing its code names them (in graph
    order), which is how unpickling rebuilds a GraphModule: records are restored by name."""
    new = torch.fx.Graph()
    new._codegen = copy.deepcopy(graph._codegen)
    env: dict[Node, Node] = {}
    for node in graph.nodes:
        name = node.name if node.op == "placeholder" else None
        env[node] = new.create_node(node.op, node.target,
                                    torch.fx.node.map_arg(node.args, env.__getitem__),
                                    torch.fx.node.map_arg(node.kwargs, env.__getitem__),
                                    name, node.type)
        env[node].meta = copy.copy(node.meta)
    return new


def _replace(graph: torch.fx.Graph, path: str, inside: list[Node], inputs: list[Node],
             outputs: list[Node]) -> None:
    """Call the block after the last of its nodes, move the parent's nodes that read the block
    and sat among them after the call, and erase the block's nodes."""
    members, last = set(inside), inside[-1]
    with graph.inserting_after(last):
        call = graph.call_module(path, tuple(inputs))
    values, cursor = ([call] if len(outputs) == 1 else []), call
    if len(outputs) > 1:
        for i in range(len(outputs)):
            with graph.inserting_after(cursor):
                cursor = graph.call_function(operator.getitem, (call, i))
            values.append(cursor)
    late = set(members)
    span = False
    for node in list(graph.nodes):
        if node is inside[0]:
            span = True
        if node is last:
            break
        if span and node not in members and any(a in late for a in node.all_input_nodes):
            if any(u in members for u in node.users):
                raise ValueError(f"blocks: the block {path!r} and its parent's node "
                                 f"{node.name!r} need each other's values; list a larger or "
                                 "a smaller block")
            cursor.append(node)  # after the block's call, in the same order
            cursor = node
            late.add(node)
    for out, value in zip(outputs, values, strict=True):
        out.replace_all_uses_with(value, delete_user_cb=lambda user: user not in members)
    for node in reversed(inside):
        graph.erase_node(node)


def split_blocks(gm: QuantGraphModule, paths: frozenset[str]) -> QuantGraphModule:
    """Turn the nodes each block's forward made (in every mode graph) into a QuantGraphModule
    at the block's path, called by the parent graph; see the module docstring."""
    graphs = {mode: mode_graph(gm, mode) for mode in (True, False)}
    moved: dict[str, tuple[str, str]] = {}
    cut: dict[str, dict[bool, torch.fx.Graph]] = {}
    for mode, graph in graphs.items():
        if mode != gm.training and graph is graphs[gm.training]:
            continue
        owner = _owners(graph, paths)
        for path in dict.fromkeys(p for n in graph.nodes if (p := owner.get(n))):
            inside = [n for n in graph.nodes if owner.get(n) == path]
            cut.setdefault(path, {})[mode] = _cut(graph, path, inside, moved)
        for node in graph.nodes:
            node.meta.pop(BLOCK_KEY, None)
            if node.op == "call_module" and str(node.target) in cut:
                block = gm.get_submodule(str(node.target))
                set_record(node, QuantRecord("block", str(node.target), type(block).__name__,
                                             str(node.target)))
    idle = sorted(paths - set(cut))
    if idle:
        warnings.warn(f"prepare: blocks {listing(idle)} are never called by the model's forward "
                      "(in train or eval mode), so they stay plain modules, neither prepared "
                      "nor GraphModules", stacklevel=user_stacklevel())
    for path, subs in cut.items():
        _install(gm, path, subs, {root: local for root, (p, local) in moved.items() if p == path})
    for root in moved:
        delattr(gm, root)
    if graphs[True] is graphs[False]:
        gm.graph = _canonical(gm.graph)
    else:
        set_mode_graphs(gm, {mode: _canonical(g) for mode, g in graphs.items()})
    return gm


def _install(gm: torch.fx.GraphModule, path: str, subs: dict[bool, torch.fx.Graph],
             quantizers: dict[str, str]) -> None:
    block = gm.get_submodule(path)
    for root, local in quantizers.items():
        if hasattr(block, local):
            raise ValueError(f"blocks: {path!r} has an attribute {local!r} already; its "
                             f"quantizer {root!r} cannot move in under that name")
        block.add_module(local, gm.get_submodule(root))
    if len(subs) == 1 or _same_graph(subs[True], subs[False]):
        subs = {mode: next(iter(subs.values())) for mode in (True, False)}
    new = QuantGraphModule(block, subs[block.training], type(block).__name__)
    graft_module_tree(new, block)
    for key in ("_modules", "_parameters", "_buffers"):  # the block's order: its state_dict's
        mine = getattr(new, key)
        for name in [n for n in getattr(block, key) if n in mine]:
            mine[name] = mine.pop(name)
    if subs[True] is not subs[False]:
        set_mode_graphs(new, subs)
    parent, _, name = path.rpartition(".")
    setattr(gm.get_submodule(parent), name, new)


# ------------------------------------------------------------------------------------------------
# putting them back


def _block_at(gm: nn.Module, path: str) -> tuple[str, torch.fx.GraphModule]:
    """The block called at ``path`` and its full path, looking through wrappers that hold it as
    their one child (``CheckpointWrapper``, ``torch.compile``'s ``OptimizedModule``)."""
    module = gm.get_submodule(path)
    while not isinstance(module, torch.fx.GraphModule):
        children = list(module.named_children())
        if len(children) != 1:
            raise TypeError(f"the block {path!r} is wrapped in a {type(module).__name__} "
                            f"holding {len(children)} modules; fxquant finds a block in a "
                            "wrapper that holds it alone")
        name, module = children[0]
        path = f"{path}.{name}"
    return path, module


def _block_calls(graph: torch.fx.Graph) -> list[Node]:
    return [n for n in graph.nodes if n.op == "call_module"
            and (r := get_record(n)) is not None and r.role == "block"]


def _inlined(gm: torch.fx.GraphModule, graph: torch.fx.Graph, mode: bool,
             name: Callable[[str, str, str], str]) -> torch.fx.Graph:
    """A copy of ``graph`` with each block call replaced by the block's graph for ``mode``,
    whose targets become ``name(called path, block path, target)`` (the block path goes
    through wrappers that do not forward attribute reads to the block: :func:`_block_at`)."""
    flat = copy.deepcopy(graph)  # keeps the codegen (pytree in/out specs) and meta
    calls = _block_calls(flat)
    for call in calls:
        path, block = _block_at(gm, str(call.target))
        wrapper = gm.get_submodule(str(call.target))
        if all(getattr(wrapper, k, None) is m for k, m in block._modules.items()):
            path = str(call.target)  # a wrapper that forwards (CheckpointWrapper, compile's)
        sub = mode_graph(block, mode)
        rename = functools.partial(name, str(call.target), path)
        env: dict[Node, object] = dict(zip([n for n in sub.nodes if n.op == "placeholder"],
                                           call.args, strict=True))
        with flat.inserting_before(call):
            out = flat.graph_copy(sub, env)
        for node in sub.nodes:
            new = env.get(node)
            if not isinstance(new, Node) or node.op == "placeholder":
                continue
            if node.op in ("call_module", "get_attr"):
                new.target = rename(str(node.target))
            record = get_record(new)
            if record is not None and record.quantizers:
                update_record(new, quantizers=tuple((s, rename(q))
                                                    for s, q in record.quantizers))
        if isinstance(out, tuple):
            for user in list(call.users):  # operator.getitem(call, i)
                user.replace_all_uses_with(out[user.args[1]])
                flat.erase_node(user)
        else:
            call.replace_all_uses_with(out)
        flat.erase_node(call)
    return _canonical(flat)


def flat_graphs(gm: torch.fx.GraphModule) -> dict[bool, torch.fx.Graph]:
    """``gm``'s graph per mode (train ``True``, eval ``False``; the same object when the
    modes share one) with the blocks' nodes inlined under their full paths (``layer1.0.conv1``,
    ``layer1.0.conv1_weight_quantizer``): the flat graph, reading ``gm``'s own modules."""
    graphs = {mode: mode_graph(gm, mode) for mode in (True, False)}
    if not any(_block_calls(g) for g in graphs.values()):
        return graphs
    name = lambda _, path, target: f"{path}.{target}"  # noqa: E731
    blocks = [_block_at(gm, str(c.target))[1] for c in _block_calls(graphs[True])]
    shared = graphs[True] is graphs[False] and all(
        mode_graph(b, True) is mode_graph(b, False) for b in blocks)
    if shared:
        flat = _inlined(gm, graphs[gm.training], gm.training, name)
        return {True: flat, False: flat}
    return {mode: _inlined(gm, g, mode, name) for mode, g in graphs.items()}


def flat_view(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` itself, or for a model with blocks a GraphModule that runs :func:`flat_graphs`
    on ``gm``'s own modules (parameters shared, same ``state_dict``, preserved attributes)."""
    graphs = flat_graphs(gm)
    if graphs[gm.training] is mode_graph(gm, gm.training):
        return gm
    view = QuantGraphModule(gm, graphs[gm.training], type(gm).__name__)
    graft_module_tree(view, gm)
    if graphs[True] is not graphs[False]:
        set_mode_graphs(view, graphs)
    for key in gm.__dict__.get(PRESERVED, ()):
        preserve(view, key, gm.__dict__[key])
    return view


def inline_blocks(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Convert's first pass: the blocks' nodes back into ``gm``'s graph, their quantizers back
    at the root under the names flat prepare gives them, each block a plain container of its
    modules (same ``state_dict`` keys): convert then lowers the flat model prepare built."""
    calls = _block_calls(gm.graph)
    if not calls:
        return gm
    names: dict[tuple[str, str], str] = {}
    blocks: dict[str, nn.Module] = {}
    for call in calls:
        path, block = str(call.target), _block_at(gm, str(call.target))[1]
        blocks[path] = block
        for local, module in list(block._modules.items()):
            if isinstance(module, Quantizer):
                root, i = f"{path.replace('.', '_')}_{local}", 0
                while hasattr(gm, root if not i else f"{root}_{i}"):
                    i += 1
                names[path, local] = root if not i else f"{root}_{i}"
                gm.add_submodule(names[path, local], module)
    graph = _inlined(gm, gm.graph, gm.training, lambda p, _, t: names.get((p, t), f"{p}.{t}"))
    for path, block in blocks.items():  # (a wrapper, if any, goes: the container takes its place)
        container = nn.Module()
        graft_module_tree(container, block)
        for key in [k for k, m in block._modules.items() if isinstance(m, Quantizer)]:
            del container._modules[key]
        parent, _, name = path.rpartition(".")
        setattr(gm.get_submodule(parent), name, container)
    gm.graph = graph
    return gm


def blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The blocks of a model prepared with ``fxquant.prepare(..., blocks=...)``, by module path,
    in the order the forward calls them (empty for a model prepared without blocks).

    Each is a GraphModule of its own, so per-block tools work on it::

        for block in fxquant.blocks(prepared).values():
            fully_shard(block)            # FSDP2, then fully_shard(prepared) at the root
        apply_activation_checkpointing(prepared, check_fn=lambda m: m in set(
            fxquant.blocks(prepared).values()))  # before FSDP, as usual
    """
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    if not isinstance(model, torch.fx.GraphModule):
        raise TypeError(f"blocks expects a model returned by fxquant.prepare, got "
                        f"{type(model).__name__}")
    calls = {str(c.target): c for g in (mode_graph(model, model.training),
                                        mode_graph(model, not model.training))
             for c in _block_calls(g)}
    return {path: model.get_submodule(path) for path in calls}
