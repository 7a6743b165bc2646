"""The float32 CPU route of the Mixer's linear maps (1x1 convolutions on oneDNN) against F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from widesparse.ops.matmul import (
    autocast_dtype,
    autocast_input,
    cpu_low_precision,
    gemm_peaks,
    linear_first,
    linear_last,
    onednn_available,
    use_onednn,
)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 5), (2, 3, 4, 5)])
def test_linear_last_matches_f_linear_with_gradients(shape, bias, onednn_route):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, requires_grad=True)
    w = torch.randn(6, shape[-1], generator=g, requires_grad=True)
    b = torch.randn(6, generator=g, requires_grad=True) if bias else None
    y, ref = linear_last(x, w, b), F.linear(x, w, b)
    assert y.shape == ref.shape and y.is_contiguous()
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)
    params = [x, w] + ([b] if bias else [])
    gy = torch.randn(ref.shape, generator=g)
    for a, r in zip(torch.autograd.grad(y, params, gy), torch.autograd.grad(ref, params, gy), strict=True):
        assert torch.allclose(a, r, rtol=1e-5, atol=1e-4)


def test_linear_last_takes_the_onednn_route_only_for_contiguous_float32_outside_autocast(onednn_route):
    x = torch.randn(4, 3)
    import platform

    x86 = platform.machine().lower() in ("x86_64", "amd64")
    assert onednn_available() == onednn_route == (torch.backends.mkldnn.is_available() and x86)
    assert use_onednn(x) == onednn_available()
    assert not use_onednn(x.double()) and not use_onednn(x.t())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not use_onednn(x)
        assert linear_last(x, torch.randn(2, 3)).dtype == torch.bfloat16  # autocast's own F.linear
    assert not use_onednn(torch.randn(0, 3))
    assert linear_last(torch.randn(2, 0, 3), torch.randn(2, 3)).shape == (2, 0, 2)  # empty: F.linear
    assert linear_first(torch.randn(2, 3), torch.randn(3, 0)).shape == (2, 0)
    xd, wd = torch.randn(5, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    assert torch.equal(linear_last(xd, wd), F.linear(xd, wd))  # float64 is exactly F.linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_first_is_weight_times_columns_plus_bias(dtype, onednn_route):
    g = torch.Generator().manual_seed(1)
    w, x, b = (torch.randn(*s, generator=g, dtype=dtype) for s in ((4, 3), (3, 10), (4,)))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(linear_first(w, x, b), w @ x + b[:, None], rtol=tol, atol=tol)
    assert torch.allclose(linear_first(w, x), w @ x, rtol=tol, atol=tol)


def test_gemm_peaks_reports_each_route():
    peaks = gemm_peaks(torch.float32, n=64, reps=1)
    assert set(peaks) == {"mm", "onednn"} and all(v > 0 for v in peaks.values())


def test_keep_freed_memory_sets_glibc_thresholds_where_glibc_is():
    import platform

    from widesparse.ops.heap import keep_freed_memory

    ok = keep_freed_memory()
    assert isinstance(ok, bool)
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert ok


def test_the_route_needs_a_large_enough_product_and_two_threads(monkeypatch):
    import widesparse.ops.matmul as kernels

    if not kernels.onednn_available():
        pytest.skip("no oneDNN route on this machine")
    x = torch.randn(64, 32)
    monkeypatch.setattr(kernels, "MIN_THREADS", 1)
    assert not use_onednn(x, 8) and use_onednn(x, kernels.MIN_MACS // x.numel())  # 2048 x 8 < 2^23 MACs
    monkeypatch.setattr(kernels, "MIN_MACS", 0)
    monkeypatch.setattr(kernels, "MIN_THREADS", torch.get_num_threads() + 1)
    assert not use_onednn(x)


def test_shapes_that_do_not_fit_get_torch_s_own_message(onednn_route):
    with pytest.raises(RuntimeError, match=r"cannot be multiplied \(4x3 and 5x2\)"):
        linear_last(torch.randn(4, 3), torch.randn(2, 5))
    with pytest.raises(RuntimeError, match=r"cannot be multiplied \(2x5 and 3x4\)"):
        linear_first(torch.randn(2, 5), torch.randn(3, 4))


def test_cpu_low_precision_and_the_early_autocast_cast():
    x = torch.randn(3, 4)
    assert not cpu_low_precision(x) and cpu_low_precision(x.bfloat16())
    assert autocast_input(x) is x and autocast_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_low_precision(x) and autocast_dtype(x) == torch.bfloat16
        y = autocast_input(x)
        assert y.dtype == torch.bfloat16 and torch.equal(y, x.bfloat16())
        assert autocast_input(x.double()).dtype == torch.float64  # autocast casts only float32
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (g,) = torch.autograd.grad(autocast_input(x).float().sum(), x)
    assert g.dtype == torch.float32 and torch.equal(g, torch.ones_like(x))


def test_a_routers_onednn_decision_is_taken_as_given(monkeypatch):
    """``onednn=True/False`` (the Mixer router's decision) overrides the size and thread checks; a non-contiguous
    or mismatched input still goes to F.linear. ``onednn_route`` is ``use_onednn`` without a tensor."""
    import widesparse.ops.matmul as matmul

    calls = []
    real = F.conv2d
    monkeypatch.setattr(matmul.F, "conv2d", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, w, b = torch.randn(4, 3), torch.randn(2, 3), torch.randn(2)
    assert not use_onednn(x, 2)  # far below MIN_MACS
    assert torch.allclose(linear_last(x, w, b, onednn=True), F.linear(x, w, b), atol=1e-6) and calls == [1]
    assert torch.equal(linear_last(x, w, b, onednn=False), F.linear(x, w, b)) and calls == [1]
    assert torch.equal(linear_last(x.t().contiguous().t(), w, b, onednn=True), F.linear(x, w, b)) and calls == [1]
    assert torch.allclose(linear_first(w, x.t().contiguous(), b, onednn=True), w @ x.t() + b[:, None], atol=1e-6)
    big = matmul.MIN_MACS
    assert matmul.onednn_route("cpu", torch.float32, big, 1) == use_onednn(torch.empty(big), 1)
    assert not matmul.onednn_route("cpu", torch.float64, big, 1) and not matmul.onednn_route("cuda", torch.float32, big)
