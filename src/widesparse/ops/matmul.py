"""Which kernel runs a dense product (the float32 CPU route through oneDNN); the heap setting is in :mod:`.heap`.

PyTorch sends a float32 ``F.linear``/``mm`` on the CPU to its BLAS (MKL in the official wheels), which on AMD
processors runs a path without AVX-512, so oneDNN, PyTorch's other CPU backend, computes the same product
much faster at IEEE float32 accuracy (figures in docs/speed.md). A 1x1 convolution is the same product and
always runs on oneDNN, forward and backward, so on the CPU in float32 these functions compute the linear maps
of the Mixer family as 1x1 convolutions (channel-last views, no copies), when the product is large enough
and at least two threads run (see :func:`use_onednn`). Elsewhere (CUDA, bf16 autocast, whose CPU matmuls
already use oneDNN, float64, small products, one thread, or no oneDNN) they are plain ``F.linear``/``addmm``.
Values are the same up to float32 summation order.

This module imports nothing of the package: any module may use it, ``cka`` included.
"""

from __future__ import annotations

import platform
import time

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["linear_last", "linear_first", "use_onednn", "onednn_route", "onednn_available", "cpu_low_precision",
           "autocast_dtype", "autocast_input", "gemm_peaks"]

# once (torch.compile must not trace the check); x86 only: measured there, while on ARM oneDNN may run through
# other backends than the BLAS it would replace
_ONEDNN = torch.backends.mkldnn.is_available() and platform.machine().lower() in ("x86_64", "amd64")


def onednn_available() -> bool:
    """Whether this process takes the oneDNN route at all (PyTorch built with oneDNN, an x86 CPU)."""
    return _ONEDNN


# The route pays only on large products (below about MIN_MACS multiply-adds oneDNN's fixed cost loses) and with
# at least MIN_THREADS threads (with one thread both libraries run alike); the measurements are in docs/speed.md.
MIN_MACS = 1 << 23
MIN_THREADS = 2


@torch.compiler.assume_constant_result
def _num_threads() -> int:
    # a constant while torch.compile traces (get_num_threads would break the graph); eager calls read it afresh
    return torch.get_num_threads()


def use_onednn(x: Tensor, out_features: int | None = None) -> bool:
    """Whether ``x`` (times a weight with ``out_features`` rows) takes the oneDNN route: a contiguous float32 CPU
    tensor outside autocast, a product of at least :data:`MIN_MACS` multiply-adds, :data:`MIN_THREADS` threads."""
    return x.is_contiguous() and onednn_route(x.device.type, x.dtype, x.numel(), out_features)


def onednn_route(device_type: str, dtype: torch.dtype, numel: int, out_features: int | None = None) -> bool:
    """:func:`use_onednn` for a contiguous tensor of ``numel`` elements of ``dtype`` on ``device_type`` (the
    router of :mod:`widesparse.ops.route` asks before the tensor exists)."""
    return (
        device_type == "cpu"
        and dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and _ONEDNN
        and torch.backends.mkldnn.enabled
        and numel > 0
        and numel * (1 if out_features is None else out_features) >= MIN_MACS
        and _num_threads() >= MIN_THREADS
    )


def cpu_low_precision(x: Tensor) -> bool:
    """Whether products with ``x`` run in bfloat16 on the CPU (under CPU autocast, or ``x`` itself bfloat16):
    ``F.linear`` then goes to oneDNN's bf16 matmul, the other half of the CPU route."""
    return x.device.type == "cpu" and (torch.is_autocast_enabled("cpu") or x.dtype == torch.bfloat16)


def autocast_dtype(x: Tensor) -> torch.dtype:
    """The dtype a linear map under the current autocast would cast ``x`` to: the autocast dtype where autocast is
    on for ``x``'s device and ``x`` is float32, else ``x.dtype``."""
    if x.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def autocast_input(x: Tensor) -> Tensor:
    """``x`` in :func:`autocast_dtype`: the cast a following linear map would make anyway, done early (so a
    permutation before it moves half the bytes)."""
    return x.to(autocast_dtype(x))


def _take_onednn(x: Tensor, out_features: int, onednn: bool | None) -> bool:
    """``onednn`` as decided by a caller's router (``None``: :func:`use_onednn` decides), for a contiguous,
    non-empty ``x`` (the 1x1 convolution's views need one)."""
    if onednn is None:
        return use_onednn(x, out_features)
    return onednn and x.is_contiguous() and x.numel() > 0


def linear_last(x: Tensor, weight: Tensor, bias: Tensor | None = None, onednn: bool | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` over the last axis of ``x`` (``weight``: ``(out, in)``); ``onednn``: take the
    1x1-convolution route or not, as a router decided (``None``: :func:`use_onednn` decides)."""
    if not _take_onednn(x, weight.shape[0], onednn) or weight.dtype != x.dtype or weight.shape[-1] != x.shape[-1]:
        return F.linear(x, weight, bias)  # (also the one to say which shapes disagree)
    n_in = x.shape[-1]
    # (..., in) as a channels-last (1, in, M, 1) image: the output comes back channels-last, i.e. (..., out)
    img = x.reshape(1, -1, 1, n_in).permute(0, 3, 1, 2)
    y = F.conv2d(img, weight.reshape(weight.shape[0], n_in, 1, 1), bias)
    return y.permute(0, 2, 3, 1).reshape(*x.shape[:-1], weight.shape[0])


def linear_first(weight: Tensor, x: Tensor, bias: Tensor | None = None, onednn: bool | None = None) -> Tensor:
    """``weight @ x + bias[:, None]`` over the first axis of a 2-D ``x`` (``weight``: ``(out, in)``); ``onednn`` as
    in :func:`linear_last`."""
    if not _take_onednn(x, weight.shape[0], onednn) or weight.dtype != x.dtype or weight.shape[-1] != x.shape[0]:
        return weight @ x if bias is None else torch.addmm(bias.unsqueeze(-1), weight, x)
    # (in, N) is a channels-first 1-D signal of length N: one 1x1 convolution
    return F.conv1d(x.unsqueeze(0), weight.unsqueeze(-1), bias).squeeze(0)


def gemm_peaks(dtype: torch.dtype, device: str = "cpu", n: int = 2048, reps: int = 5) -> dict[str, float]:
    """Best GFLOP/s of an ``n^3`` product per route: ``"mm"`` (``torch.mm``) and, on the CPU, ``"onednn"``
    (:func:`linear_last`, which is oneDNN in float32 and ``F.linear`` otherwise). MFU is quoted against the max."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    routes = {"mm": lambda: a @ b}
    if torch.device(device).type == "cpu":
        routes["onednn"] = lambda: linear_last(a, b)
    peaks = {}
    for name, fn in routes.items():
        fn()
        sync()
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - t)
        peaks[name] = 2 * n**3 / best / 1e9
    return peaks


