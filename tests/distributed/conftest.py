"""Two real processes in one gloo process group on 127.0.0.1, shared by the session's tests."""

from __future__ import annotations

import pytest
import torch

from tests.distributed._ranks import Ranks


@pytest.fixture(scope="session")
def ranks():
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("this torch build has no gloo backend")
    pool = Ranks(world_size=2)
    yield pool
    pool.close()
