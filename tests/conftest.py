"""Shared fixtures (the shared helpers that are not fixtures live in tests/helpers.py)."""

from __future__ import annotations

import pytest
import torch

from widesparse.models import list_models


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a test module of tiny tensors: on a busy 2-core machine two OpenMP threads spin
    against other processes and make each small op up to 100x slower. Use with
    ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=list_models())
def model_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def onednn_route(monkeypatch: pytest.MonkeyPatch) -> bool:
    """The float32 oneDNN route of widesparse.ops.matmul for every size and thread count (tests use tiny shapes);
    returns whether this machine takes it at all."""
    import widesparse.ops.matmul as kernels

    monkeypatch.setattr(kernels, "MIN_MACS", 0)
    monkeypatch.setattr(kernels, "MIN_THREADS", 1)
    return kernels.onednn_available()
