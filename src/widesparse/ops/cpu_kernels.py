"""Optional compiled CPU kernels for the Mixer family's elementwise work and the RP-Mixer's permutations.

Each kernel replaces an ATen kernel that was measurably slower on the benchmark workload
(``benchmarks/bench_mixer.py``); the figures, and what was tried and dropped, are in docs/speed.md.

* :class:`GELU`: in bfloat16 an activation takes one of only 65,536 values, so the derivative of the exact (erf)
  GELU at every one of them fits a 256 KiB float32 table, built once per process by PyTorch's own
  ``gelu_backward``. The backward on bfloat16 CPU tensors is ``bf16(float(grad) * table[bits(z)])``: the same
  float32 product, rounded the same way, as ATen's kernel, which evaluates ``erf`` and ``exp`` per element
  (tests compare every bit pattern), at a fraction of its cost.
* :class:`LayerNorm`: bfloat16 rows with float32 weight and bias (AVX-512 rows where built), forward and
  backward faster than ATen's; the weight and bias gradients are float32 sums (ATen 2.13 sums them in bfloat16
  for a bfloat16 input, which drifts far from a float64 reference over many rows).
* :func:`take_columns` / :func:`permute_columns`: ``x[..., perm]`` four rows per index load (faster than
  ``torch.gather`` in bf16), :func:`permute_columns` as one C++ autograd function (no Python per call: the tiny
  sweeps' RP-Mixer steps were mostly that). The RP-Mixer's ``J_1`` and ``J_2``
  (:func:`widesparse.linalg.permute_last`) use it.
* :func:`permuted_layer_norm` (LayerNorm and ``J_1`` in one pass, bf16) and :func:`permute_add` (``J_2`` and
  the residual add): one pass over memory instead of two.

The kernels are C++ (``cpu_kernels.cpp``) compiled on first use with :func:`torch.utils.cpp_extension.load_inline`
(a C++ compiler and ninja; about 20 s once, then cached by PyTorch under ``TORCH_EXTENSIONS_DIR``) for AVX-512 or
AVX2 (OpenMP threads, as ATen's own kernels). Where that fails, on other CPUs, on other devices, under
``torch.compile`` (Inductor writes its own kernels), or with ``WIDESPARSE_CPU_KERNELS=0``, everything runs
ATen's kernels: the same values (LayerNorm: within one bf16 rounding), the speed of before.

This module imports nothing of the package.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "gelu",
    "gelu_backward",
    "layer_norm",
    "permuted_layer_norm",
    "take_columns",
    "permute_columns",
    "permute_add",
    "load",
    "status",
    "enabled",
    "gelu_derivative_table",
]

log = logging.getLogger(__name__)

_SOURCE_FILE = Path(__file__).with_name("cpu_kernels.cpp")

_FUNCTIONS = (
    "table_mul_bf16",
    "take_columns",
    "permute_columns",
    "permute_add",
    "layer_norm_bf16_forward",
    "layer_norm_bf16_backward",
)
_lock = threading.Lock()
_state: dict[str, Any] = {}


def enabled() -> bool:
    """Whether the compiled kernels may be used (``WIDESPARSE_CPU_KERNELS`` is not ``0``)."""
    return os.environ.get("WIDESPARSE_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


# compiled for the vector ISA PyTorch itself dispatches to (one build per ISA, so a shared cache never hands one
# machine another's code); a baseline x86-64 build was slower than ATen's kernel, so it is not used
# (docs/speed.md)
_ARCH_FLAGS = {"AVX512": "-march=x86-64-v4", "AVX2": "-march=x86-64-v3"}


def load() -> Any | None:
    """The compiled extension, building it on the first call; ``None`` where disabled, where the CPU has neither
    AVX-512 nor AVX2 (as PyTorch reports it), or where it cannot build (the reason is logged once)."""
    if not enabled():
        return None
    if "ext" in _state:
        return _state["ext"]
    with _lock:
        if "ext" not in _state:
            _state["ext"] = _build()
        return _state["ext"]


def status() -> dict[str, Any]:
    """For benchmark records: ``enabled`` (the environment allows them), ``isa`` (PyTorch's CPU capability) and
    ``built`` (this process has the extension; builds it if need be)."""
    return {"enabled": enabled(), "isa": torch.backends.cpu.get_cpu_capability(), "built": load() is not None}


def _build() -> Any | None:
    isa = torch.backends.cpu.get_cpu_capability()
    if isa not in _ARCH_FLAGS:
        log.info("widesparse: no CPU kernels for capability %s; using ATen's", isa)
        return None
    log.info("widesparse: loading the CPU kernels (the first time, building them takes about 20 s)")
    name = f"widesparse_cpu_kernels_{isa.lower()}"
    _remove_stale_lock(name)
    try:
        from torch.utils.cpp_extension import load_inline

        # the build's warnings (compiler version checks) go to the log: they must not fail a caller that turns
        # warnings into errors (pytest -W error)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ext = load_inline(
                name, cpp_sources=_SOURCE_FILE.read_text(),
                functions=list(_FUNCTIONS),
                extra_cflags=["-O3", "-fopenmp", _ARCH_FLAGS[isa]], extra_ldflags=["-fopenmp"], verbose=False,
            )
        for w in caught:
            log.info("widesparse: CPU kernel build: %s", w.message)
        log.debug("widesparse: CPU kernels from %s", getattr(ext, "__file__", "?"))
        return ext
    except Exception as exc:  # no compiler, no ninja, no headers: ATen's kernels it is
        log.warning("widesparse: CPU kernels unavailable, using ATen's (%s: %s)", type(exc).__name__, exc)
        return None


def _remove_stale_lock(name: str, older_than_s: float = 600.0) -> None:
    """PyTorch's build lock outlives a build that was killed, and every later process would then wait on it
    forever: a lock older than any build is removed (builds take about 20 s)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        lock = Path(_get_build_directory(name, False)) / "lock"
        age = time.time() - lock.stat().st_mtime if lock.exists() else 0.0
        if age > older_than_s:
            log.warning("widesparse: removing a stale build lock %s (%.0f s old)", lock, age)
            lock.unlink(missing_ok=True)
    except Exception as exc:  # a private PyTorch helper: never let it stop the build
        log.info("widesparse: could not check for a stale build lock (%s)", exc)


def take_columns(x: Tensor, idx: Tensor) -> Tensor | None:
    """``x[:, idx]`` for a contiguous 2-D CPU ``x`` of 2- or 4-byte elements and an int32/int64 ``idx``, by the
    compiled kernel; ``None`` where it does not apply or is not built (the caller then gathers with PyTorch). No
    autograd: it declines an ``x`` that requires grad (see :func:`permute_columns`)."""
    if (
        x.device.type != "cpu"
        or x.dim() != 2
        or x.element_size() not in (2, 4)
        or not x.is_contiguous()
        or idx.dim() != 1
        or idx.device.type != "cpu"
        or idx.dtype not in (torch.int32, torch.int64)
        or (x.requires_grad and torch.is_grad_enabled())
    ):
        return None
    ext = load()
    return None if ext is None else ext.take_columns(x, idx.contiguous())


def permute_columns(x: Tensor, perm: Tensor, inv: Tensor) -> Tensor | None:
    """``x[..., perm]`` for a permutation ``perm`` of ``x``'s last axis (``inv`` its inverse, not checked) as one
    compiled autograd function (backward: the same with ``perm`` and ``inv`` swapped); ``None`` where it does not
    apply: not a CPU tensor of 2- or 4-byte elements, while compiling, or not built."""
    if (
        x.device.type != "cpu"
        or x.dim() < 1
        or x.element_size() not in (2, 4)
        or perm.device.type != "cpu"
        or perm.dtype not in (torch.int32, torch.int64)
        or torch.compiler.is_compiling()
    ):
        return None
    ext = load()
    return None if ext is None else ext.permute_columns(x, perm, inv)


def permute_add(h: Tensor, perm: Tensor, inv: Tensor, residual: Tensor) -> Tensor | None:
    """``residual + h.reshape(-1, n)[:, perm].reshape(residual.shape)`` (``n = perm.numel()``, ``inv`` its inverse)
    as one compiled autograd function: the RP-Mixer's ``J_2`` and residual add. Both float32 or both bfloat16 on
    the CPU (the sum rounded once, as ATen's); ``None`` elsewhere, while compiling, or where not built."""
    if (
        h.device.type != "cpu"
        or residual.device.type != "cpu"
        or h.dtype != residual.dtype
        or h.dtype not in (torch.float32, torch.bfloat16)
        or perm.dtype != torch.int64
        or perm.device.type != "cpu"
        or torch.compiler.is_compiling()
    ):
        return None
    ext = load()
    return None if ext is None else ext.permute_add(h, perm, inv, residual)


def gelu_derivative_table() -> Tensor:
    """``GELU'(v)`` in float32 for every bfloat16 bit pattern ``v`` (index = the 16 bits as unsigned), by ATen."""
    if "table" not in _state:
        values = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
        _state["table"] = torch.ops.aten.gelu_backward(torch.ones_like(values), values).contiguous()
    return _state["table"]


def gelu_backward(grad: Tensor, z: Tensor) -> Tensor:
    """``d GELU(z) / dz * grad`` (exact GELU): the table kernel for bfloat16 CPU tensors where it is built, else
    ATen's ``gelu_backward``."""
    if grad.dtype == z.dtype == torch.bfloat16 and z.device.type == "cpu" and grad.device.type == "cpu":
        ext = load()
        if ext is not None:
            return ext.table_mul_bf16(grad, z, gelu_derivative_table())
    return torch.ops.aten.gelu_backward(grad, z)


class _Gelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, z: Tensor) -> Tensor:
        ctx.save_for_backward(z)
        return F.gelu(z)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (z,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: ATen's kernel, which has a derivative of its own
            return torch.ops.aten.gelu_backward(grad, z)
        return gelu_backward(grad, z)


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """``F.gelu(x, approximate)``; its backward takes the table kernel for exact GELU on bfloat16 CPU tensors."""
    if (
        approximate == "none"
        and x.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and x.requires_grad
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and load() is not None
    ):
        return _Gelu.apply(x)
    return F.gelu(x, approximate=approximate)


_LN_MAX = 4096  # the kernel's longest row (LN_MAX in cpu_kernels.cpp)


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, eps: float, inv: Tensor | None) -> Tensor:
        y, mean, rstd = load().layer_norm_bf16_forward(x, weight, bias, eps, inv)
        ctx.save_for_backward(x, weight, bias, mean, rstd, inv)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:
        x, weight, bias, mean, rstd, inv = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: ATen's backward, which has a derivative of its own
            if inv is not None:  # undo the permutation: gradient of LN's own output
                grad = grad.reshape(grad.shape[0], -1)[:, inv].reshape(x.shape)
            stat_shape = (*x.shape[:-1], 1)
            gx, gw, gb = torch.ops.aten.native_layer_norm_backward(
                grad, x, [x.shape[-1]], mean.view(stat_shape), rstd.view(stat_shape), weight, bias, [True, True, True]
            )
            return gx, gw, gb, None, None
        gx, gw, gb = load().layer_norm_bf16_backward(grad.contiguous(), x, mean, rstd, weight, inv)
        return gx, gw, gb, None, None


def _kernel_layer_norm(x: Tensor, n: int, weight: Tensor | None, bias: Tensor | None) -> bool:
    return (
        x.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and x.dim() >= 1
        and 0 < x.shape[-1] == n <= _LN_MAX
        and weight is not None
        and bias is not None
        and weight.dtype == bias.dtype == torch.float32
        and not torch.compiler.is_compiling()
        and load() is not None
    )


def permuted_layer_norm(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, perm: Tensor, inv: Tensor
) -> Tensor | None:
    """``layer_norm(x).reshape(B, P)[:, perm]`` over ``x``'s last axis (``P = perm.numel()`` entries per example,
    whole rows of ``x``) as one compiled pass, forward and backward: the RP-Mixer's LayerNorm and ``J_1``. ``inv``
    is ``perm``'s inverse (not checked). ``None`` where it does not apply (``x`` not bfloat16 on the CPU, affine
    parameters not float32, ...): the caller then normalises and permutes."""
    if not (
        _kernel_layer_norm(x, x.shape[-1] if x.dim() else 0, weight, bias)
        and inv.dtype == torch.int64
        and inv.device.type == "cpu"
        and x.numel() % max(inv.numel(), 1) == 0
    ):
        return None
    return _LayerNorm.apply(x, weight, bias, float(eps), inv.contiguous())


def layer_norm(
    x: Tensor, normalized_shape: list[int] | tuple[int, ...], weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """``F.layer_norm``; on bfloat16 CPU tensors over the last axis with float32 affine parameters it runs the
    compiled kernel, forward and backward (rows up to 4096 elements)."""
    if len(normalized_shape) == 1 and _kernel_layer_norm(x, normalized_shape[0], weight, bias):
        return _LayerNorm.apply(x, weight, bias, float(eps), None)
    return F.layer_norm(x, normalized_shape, weight, bias, eps)


