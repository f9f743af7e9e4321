"""The README's main job runs end to end on real data (scikit-learn digits) in seconds."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_trains_converts_saves_and_reaches_95_percent(tmp_path, capsys):
    pytest.importorskip("sklearn", reason="the digits data ships with scikit-learn")
    quickstart = _load("quickstart")
    accuracy = quickstart.main(["--out", str(tmp_path / "bnn.fxq")])
    out = capsys.readouterr().out
    assert accuracy >= 0.95
    assert re.search(r"test accuracy: \d+\.\d%\s*$", out)
    assert (tmp_path / "bnn.fxq").stat().st_size < 150_000  # float32 weights: 344,104 bytes
    assert "Ratio of MACs that are binarized" in out
