"""Every test runs the engine's torch paths unless it asks for the compiled CPU kernels (`test_compiled_cpu.py`):
they load process-wide once enough work has run, which would make a test's path depend on the tests before it."""
from __future__ import annotations

import pytest

from modeconn_fast.engine import compiled_cpu


@pytest.fixture(autouse=True)
def torch_paths_only(monkeypatch):
    monkeypatch.setattr(compiled_cpu, "kernels", lambda: None)
