"""Shared test setup: lint the graph after every fxquant pass, not only after the last."""

import pytest

from fxquant.graph import pipeline


@pytest.fixture(autouse=True)
def _lint_every_pass(monkeypatch):
    monkeypatch.setattr(pipeline, "CHECK_EVERY_PASS", True)
