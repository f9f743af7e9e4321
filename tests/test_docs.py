"""Every Python block of README.md and docs/ runs, so the documentation cannot drift from the code.

For each markdown page, the fenced blocks whose info string starts with ``python`` (or ``py``,
``pycon``) run in order in one namespace per page, in a fresh temporary working directory. A
block whose code starts with ``>>>`` is a doctest: its printed output must match. A block marked
``no-run`` in its info string (```` ```python no-run ````) is skipped; it is meant for the few
things that cannot run here (another library's code, torchrun, a GPU).
"""

from __future__ import annotations

import doctest
import importlib.util
import re
import warnings
from pathlib import Path

import pytest
import torch

from fxquant.quantizers import get_progressive_sign_scale, set_progressive_sign_scale

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
RUNNABLE = {"python", "py", "pycon"}
FENCE = re.compile(r"^(?P<fence>```+|~~~+)[ \t]*(?P<info>[^\n`]*)\n(?P<code>.*?)^(?P=fence)[ \t]*$",
                   re.DOTALL | re.MULTILINE)


def code_blocks(text: str) -> list[tuple[int, str, str]]:
    """(line number, info string, code) of every fenced block of a markdown text."""
    return [(text.count("\n", 0, m.start()) + 1, m["info"].strip(), m["code"])
            for m in FENCE.finditer(text)]


def runnable(info: str) -> bool:
    words = info.replace(",", " ").split()
    return bool(words) and words[0] in RUNNABLE and "no-run" not in words[1:]


def run_block(code: str, namespace: dict, where: str) -> None:
    """Execute one block in ``namespace``; a ``>>>`` block is checked as a doctest."""
    if code.lstrip().startswith(">>>"):
        test = doctest.DocTestParser().get_doctest(code, namespace, where, where, 0)
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
        failures: list[str] = []
        runner.run(test, out=failures.append, clear_globs=False)
        namespace.update(test.globs)  # DocTest ran on a copy of the namespace
        if runner.failures:
            pytest.fail(f"{where}: doctest failed\n" + "".join(failures), pytrace=False)
    else:
        exec(compile(code, where, "exec"), namespace)  # noqa: S102 - the docs are ours


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


class TestExtraction:
    def test_finds_python_and_skips_other_languages_and_no_run(self):
        text = ("```python\na = 1\n```\n\n```bash\nls\n```\n"
                "```python no-run\nimport larq\n```\n````python\nb = 2\n````\n")
        blocks = [(line, code) for line, info, code in code_blocks(text) if runnable(info)]
        assert blocks == [(1, "a = 1\n"), (11, "b = 2\n")]

    def test_a_doctest_block_compares_output(self):
        namespace: dict = {}
        run_block(">>> x = 2\n>>> x + 1\n3\n", namespace, "ok")
        assert namespace["x"] == 2
        with pytest.raises(pytest.fail.Exception, match="doctest failed"):
            run_block(">>> 1 + 1\n3\n", {}, "bad")

    def test_every_page_with_python_has_runnable_blocks(self):
        assert any(runnable(info) for page in PAGES
                   for _, info, _ in code_blocks(page.read_text()))


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_page_code_runs(page: Path, tmp_path, monkeypatch):
    """Each page's Python blocks run in order in one namespace (examples may write files)."""
    blocks = [(line, code) for line, info, code in code_blocks(page.read_text()) if runnable(info)]
    if not blocks:
        pytest.skip("no Python blocks")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    threads, scale = torch.get_num_threads(), get_progressive_sign_scale()
    torch.set_num_threads(1)  # tiny models: extra threads only contend on a busy machine
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the documented code must not trip fxquant's warnings
            # torch's own deprecations (dynamo instantiates autograd Functions while tracing)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.")
            for line, code in blocks:
                run_block(code, namespace, f"{_page_id(page)}:{line}")
    finally:  # a page is a fresh process to its reader: undo its process-wide settings
        torch.set_num_threads(threads)
        set_progressive_sign_scale(scale)


def test_api_md_is_generated_from_the_current_docstrings():
    """docs/api.md is what docs/gen_api.py writes today (run it after changing a docstring)."""
    spec = importlib.util.spec_from_file_location("gen_api", ROOT / "docs" / "gen_api.py")
    gen_api = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_api)
    assert (ROOT / "docs" / "api.md").read_text() == gen_api.render(), (
        "docs/api.md is stale: run `python docs/gen_api.py`")


def test_each_api_md_example_runs_on_its_own():
    """An API example pasted alone works: it imports what it uses (gen_api adds the imports)."""
    text = (ROOT / "docs" / "api.md").read_text()
    blocks = [(line, code) for line, info, code in code_blocks(text) if runnable(info)]
    assert len(blocks) >= 5
    for line, code in blocks:
        run_block(code, {"__name__": "docs_api_example"}, f"docs/api.md:{line}")
