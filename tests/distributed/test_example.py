"""examples/distributed.py runs as documented (torchrun, 2 ranks) and with FSDP2, briefly.

``--steps`` stops training after a few optimizer steps; what is checked is the whole path: the
ranks train, convert, save one file, and that file loads in this single process (no process
group) with the accuracy the example printed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fxquant
from tests.distributed._ranks import free_port

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "distributed.py"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                                reason="the digits data ships with scikit-learn")


def _example():
    spec = importlib.util.spec_from_file_location("example_distributed", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _accuracy_of_file(path: Path) -> float:
    example = _example()
    x, y = example.load_digits()
    _, _, x_test, y_test = example.split(x * 2 - 1, y)
    return example.accuracy(fxquant.load(path, example.make_model()), x_test, y_test)


def test_torchrun_ddp_trains_saves_one_file_that_loads_in_one_process(tmp_path):
    out = tmp_path / "ddp.fxq"
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(EXAMPLE),
         "--steps", "4", "--out", str(out)],
        capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DDP on 2 rank(s) (gloo), 4 steps" in result.stdout
    printed = re.search(r"loaded in a single process: test accuracy (\d+\.\d)%", result.stdout)
    assert printed, result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp.fxq"]  # one file, no shards
    assert f"{100 * _accuracy_of_file(out):.1f}" == printed[1]


def _run_example(rank: int, world_size: int, argv: list[str]) -> float:
    return _example().main(argv)


def test_fsdp_flag_trains_sharded_and_the_file_loads_in_one_process(ranks, tmp_path):
    out = tmp_path / "fsdp.fxq"
    accuracy, _ = ranks.run(_run_example, ["--fsdp", "--steps", "4", "--out", str(out)])
    assert _accuracy_of_file(out) == accuracy
    assert accuracy > 0.5  # 4 steps of Adam on digits: far above chance (0.1)
    loaded = fxquant.load(out, _example().make_model())
    assert fxquant.is_converted(loaded)
    assert all(type(t) is torch.Tensor or type(t) is torch.nn.Parameter
               for t in loaded.state_dict().values())
