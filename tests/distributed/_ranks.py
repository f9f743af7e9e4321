"""Run a function on 2 real processes joined by a gloo process group on 127.0.0.1.

:class:`Ranks` starts ``world_size`` spawned processes once; each joins one ``gloo`` process group
(``tcp://127.0.0.1:<free port>``, loopback only) and waits for work. ``ranks.run(fn, *args)``
calls ``fn(rank, world_size, *args)`` on every rank at the same time and returns the per-rank
results, in rank order. ``fn`` must be a module-level function of an importable module (a test
module is fine: it is imported by its file in the worker). A failure on any rank, or a run
longer than ``timeout`` seconds, stops every process and raises here with the rank's traceback
(the next ``run`` starts fresh processes), so a broken collective costs seconds, not a hang.

Starting the processes (importing torch twice on 2 cores) is the slow part, about 2-5 s; a
session shares one :class:`Ranks` through the ``ranks`` fixture, so each test pays only its own
work.
"""

from __future__ import annotations

import importlib.util
import os
import queue
import socket
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch.multiprocessing as mp

__all__ = ["Ranks", "free_port"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it: bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _function(module: str, qualname: str, file: str | None) -> Callable[..., Any]:
    if module not in sys.modules:
        if file is None:
            __import__(module)
        else:
            spec = importlib.util.spec_from_file_location(module, file)
            loaded = importlib.util.module_from_spec(spec)
            sys.modules[module] = loaded
            spec.loader.exec_module(loaded)
    obj: Any = sys.modules[module]
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _serve(rank: int, world_size: int, port: int, tasks: Any, results: Any) -> None:
    import torch
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    torch.set_num_threads(1)  # 2 ranks on 2 cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=60))
    try:
        while (task := tasks.get()) is not None:
            module, qualname, file, args = task
            try:
                value = _function(module, qualname, file)(rank, world_size, *args)
                ForkingPickler.dumps(value)  # fails here, reported, not in the queue's thread
                results.put((rank, "ok", value))
            except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
                results.put((rank, "error", traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class Ranks:
    """``world_size`` spawned processes in one gloo process group; see the module docstring."""

    def __init__(self, world_size: int = 2, timeout: float = 60.0) -> None:
        self.world_size, self.timeout = world_size, timeout
        self._procs: list[Any] = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = free_port()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._results = ctx.Queue()
        self._procs = [ctx.Process(target=_serve, daemon=True,
                                   args=(r, self.world_size, port, self._tasks[r], self._results))
                       for r in range(self.world_size)]
        for p in self._procs:
            p.start()

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> list[Any]:
        """``[fn(rank, world_size, *args) for each rank]``, run at the same time on every rank."""
        if not self._procs or not all(p.is_alive() for p in self._procs):
            self.close()
            self._start()
        module = sys.modules.get(fn.__module__)
        file = getattr(module, "__file__", None)
        for q in self._tasks:
            q.put((fn.__module__, fn.__qualname__, file, args))
        got: dict[int, Any] = {}
        limit = self.timeout if timeout is None else timeout
        while len(got) < self.world_size:
            try:
                rank, status, value = self._results.get(timeout=limit)
            except queue.Empty:
                self.close()
                missing = sorted(set(range(self.world_size)) - set(got))
                raise TimeoutError(f"{fn.__qualname__}: ranks {missing} gave no result within "
                                   f"{limit} s") from None
            if status == "error":
                self.close()
                raise RuntimeError(f"{fn.__qualname__} failed on rank {rank}:\n{value}")
            got[rank] = value
        return [got[r] for r in range(self.world_size)]

    def close(self) -> None:
        """Stop the processes (politely, then by force)."""
        for q, p in zip(getattr(self, "_tasks", []), self._procs, strict=False):
            if p.is_alive():
                try:
                    q.put(None)
                except (OSError, ValueError):
                    pass
        for p in self._procs:
            p.join(timeout=1)  # leaving the group and exiting takes long on a busy machine
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._procs = []
