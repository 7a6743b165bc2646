"""Shared fixtures: small versions of every registered model."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from widesparse.models import create_model, list_models

# Small, rectangular sizes: S = (8/2) * (8/4) = 8 tokens, C = 5 channels, hidden widths != S, C (gamma != 1).
SMALL: dict[str, Any] = {
    "image_size": 8,
    "patch_size": (2, 4),
    "in_chans": 2,
    "dim": 5,
    "depth": 2,
    "num_classes": 4,
}
HIDDEN: dict[str, Any] = {"token_hidden": 3, "channel_hidden": 7}


# models on raw pixels (the image itself is X in R^{H x W*in_chans}): no patch size, no dim
PIXEL_MLPS = {"monarch_mlp", "kron_mlp"}


def small_kwargs(name: str, **extra: Any) -> dict[str, Any]:
    """Keyword arguments that shrink any registered model to a test size."""
    if name in PIXEL_MLPS:
        return {"image_size": 8, "in_chans": 2, "depth": 2, "num_classes": 4, **extra}
    kw = dict(SMALL)
    if "s_mixer" not in name:
        kw.update(HIDDEN)
    kw.update(extra)
    return kw


def make_small(name: str, **extra: Any) -> torch.nn.Module:
    """A small instance of ``name`` with a non-zero head (so that every parameter receives a gradient)."""
    model = create_model(name, **small_kwargs(name, **extra))
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        w = model.head.weight
        w.copy_(torch.randn(w.shape, generator=g, dtype=w.dtype))
    return model


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
