"""Generate docs/api.md from the public API (``__all__``) and its docstrings.

    python docs/gen_api.py

Every public name of the modules in ``MODULES`` gets its signature and docstring; a class also
gets its public methods, class methods and properties (those it defines itself). Signatures are
fenced as ```` ```python no-run ```` (they are not statements); docstring examples (``>>>``) are
fenced as ```` ```pycon ```` and run, in page order, in ``tests/test_docs.py``. A docstring
example runs as a doctest in its module's namespace, so it may use the module's names bare
(``quantizers(gm)`` in ``fxquant.training``); here each example first imports the names it uses
without defining them, so that it also runs when pasted. ``tests/test_docs.py`` checks that
api.md is what this script writes.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import sys
import textwrap
from pathlib import Path
from typing import Any

MODULES = ["fxquant", "fxquant.quantizers", "fxquant.wage", "fxquant.training", "fxquant.inspect",
           "fxquant.io", "fxquant.config", "fxquant.ops", "fxquant.kernels", "fxquant.nn", "fxquant.graph.recipe",
           "fxquant.graph.meta", "fxquant.graph.tracer", "fxquant.graph.pipeline",
           "fxquant.graph.passes"]


def _signature(obj: object) -> str:
    try:
        return str(inspect.signature(obj))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""


# -- docstring examples ----------------------------------------------------------------------------

def _split_examples(doc: str) -> list[tuple[bool, str]]:
    """``doc`` as (is_example, text) pieces: an example is a run of non-blank lines starting at a
    ``>>>`` line (its source and expected output, as doctest reads it), dedented."""
    pieces: list[tuple[bool, list[str]]] = []
    for line in doc.splitlines():
        if line.lstrip().startswith(">>>") and not (pieces and pieces[-1][0]):
            pieces.append((True, [line]))
        elif pieces and pieces[-1][0] and line.strip():
            pieces[-1][1].append(line)
        elif pieces and not pieces[-1][0]:
            pieces[-1][1].append(line)
        else:
            pieces.append((False, [line]))
    return [(is_example, textwrap.dedent("\n".join(lines)).strip("\n") if is_example
             else "\n".join(lines)) for is_example, lines in pieces]


def _free_names(sources: list[str]) -> list[str]:
    """Names the example code reads without binding them (builtins aside), in order of use."""
    loaded: dict[str, None] = {}
    bound: set[str] = set()
    for source in sources:
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Name):
                if isinstance(node.ctx, ast.Load):
                    loaded.setdefault(node.id)
                else:
                    bound.add(node.id)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                bound.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                bound.add(node.name)
            elif isinstance(node, ast.arg):
                bound.add(node.arg)
    return [n for n in loaded if n not in bound and not hasattr(builtins, n)]


def _import_line(name: str, value: Any, public: Any) -> str | None:
    """An import statement that binds ``name`` to ``value`` (None if there is none)."""
    if inspect.ismodule(value):
        parent, _, leaf = value.__name__.rpartition(".")
        if value.__name__ == name:
            return f"import {name}"
        if leaf == name:
            return f"from {parent} import {name}"
        return f"import {value.__name__} as {name}"
    for module in (public, sys.modules.get(getattr(value, "__module__", "") or "")):
        if module is not None and getattr(module, name, None) is value:
            return f"from {module.__name__} import {name}"
    return None


def _render_doc(doc: str, home: Any, public: Any) -> list[str]:
    """The docstring with its examples fenced as pycon, made self-contained: names the examples
    take from ``home`` (the module they run in as doctests) are imported in the first one."""
    pieces = _split_examples(doc)
    sources = [ex.source for is_example, text in pieces if is_example
               for ex in _examples(text)]
    namespace = vars(home) if home is not None else {}
    imports = [line for name in _free_names(sources) if name in namespace
               if (line := _import_line(name, namespace[name], public)) is not None]
    lines: list[str] = []
    for is_example, text in pieces:
        if not is_example:
            lines.append(text)
            continue
        if imports:
            text = "\n".join(f">>> {line}" for line in imports) + "\n" + text
            imports = []
        lines += ["```pycon", text, "```"]
    return ["\n".join(lines).strip("\n"), ""]


def _examples(text: str) -> list[Any]:
    import doctest

    return doctest.DocTestParser().get_examples(text)


# -- entries ---------------------------------------------------------------------------------------

def _home(obj: object) -> Any:
    return sys.modules.get(getattr(obj, "__module__", "") or "")


SKIPPED_METHODS = {"forward", "extra_repr"}  # nn.Module protocol: the class docstring says it


def _methods(cls: type) -> list[tuple[str, object, str]]:
    """(name, attribute, kind) for the public methods and properties ``cls`` defines itself with a
    docstring of their own (an undocumented override is its base's method)."""
    found = []
    for name, raw in vars(cls).items():
        function = getattr(raw, "fget", None) or getattr(raw, "__func__", raw)
        if (name.startswith("_") or name in SKIPPED_METHODS
                or not getattr(function, "__doc__", None)):
            continue
        if isinstance(raw, property):
            found.append((name, raw, "property"))
        elif isinstance(raw, classmethod):
            found.append((name, getattr(cls, name), "classmethod"))
        elif isinstance(raw, staticmethod):
            found.append((name, getattr(cls, name), "staticmethod"))
        elif inspect.isfunction(raw):
            found.append((name, raw, "method"))
    return found


def _method_entry(cls: type, name: str, attr: object, kind: str, public: Any) -> list[str]:
    label = f"{cls.__name__}.{name}"
    lines = [f"#### `{label}`" + ("" if kind == "method" else f" ({kind})"), ""]
    if kind != "property":
        signature = _signature(attr)
        if kind == "method":  # drop self
            signature = signature.replace("(self, ", "(", 1).replace("(self)", "()", 1)
        lines += [f"```python no-run\n{label}{signature}\n```", ""]
    doc = inspect.getdoc(attr)
    if doc:
        lines += _render_doc(doc, _home(cls), public)
    return lines


def _entry(module: str, name: str) -> list[str]:
    public = importlib.import_module(module)
    obj = getattr(public, name)
    kind = "class" if inspect.isclass(obj) else "function" if callable(obj) else "value"
    lines = [f"### `{module}.{name}`", ""]
    if kind in ("class", "function"):
        lines += [f"```python no-run\n{name}{_signature(obj)}\n```", ""]
    doc = inspect.getdoc(obj) if kind != "value" else None
    if doc:
        lines += _render_doc(doc, _home(obj), public)
    if kind == "class":
        for method, attr, method_kind in _methods(obj):
            lines += _method_entry(obj, method, attr, method_kind, public)
    return lines


def render() -> str:
    """The text of docs/api.md."""
    out = ["# API reference", "",
           "Generated by `docs/gen_api.py` from `__all__` and docstrings; every example below runs "
           "in `tests/test_docs.py`.", ""]
    seen: set[int] = set()
    for module in MODULES:
        mod = importlib.import_module(module)
        out += [f"## `{module}`", "", (inspect.getdoc(mod) or "").split("\n\n")[0], ""]
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name)
            if inspect.ismodule(obj):
                continue
            if id(obj) in seen and not isinstance(obj, (int, str, tuple)):
                out += [f"- `{name}`: see above.", ""]
                continue
            seen.add(id(obj))
            out += _entry(module, name)
    return "\n".join(out).rstrip("\n") + "\n"


def main() -> None:
    Path(__file__).with_name("api.md").write_text(render())


if __name__ == "__main__":
    main()
