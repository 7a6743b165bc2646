"""Optional compiled CPU kernels: the bfloat16 GELU backward as one table lookup per element, and column gathers.

In bfloat16 an activation takes one of only 65,536 values, so the derivative of the exact (erf) GELU at every
one of them fits a 256 KiB float32 table, built once per process by PyTorch's own ``gelu_backward``. The
backward of :class:`GELU` on bfloat16 CPU tensors is then ``bf16(float(grad) * table[bits(z)])``: the same
float32 product, rounded the same way, as ATen's kernel, which evaluates ``erf`` and ``exp`` per element (tests
compare every bit pattern). Measured on the 2-core AMD EPYC of ``benchmarks/``: 0.50 ms against ATen's 0.84 ms
on 4.2 M elements, and the issue-13 Mixer training step under bf16 autocast 1.047x faster.

:func:`take_columns` gathers the columns of a ``(B, n)`` matrix by one index, four rows per index load: the
RP-Mixer's permutations ``J_1``/``J_2`` (through :func:`widesparse.linalg.permute_last`), 1.7x faster than
PyTorch's broadcast-index gather; the RP-Mixer bf16 step went from 0.873x to 0.927x of the Mixer's.

The kernels are C++ compiled on first use with :func:`torch.utils.cpp_extension.load_inline` (a C++ compiler and
ninja, about 20 s once, then cached by PyTorch under ``TORCH_EXTENSIONS_DIR``) for AVX-512 or AVX2 (OpenMP
threads, as ATen's own kernels). Where that fails, on other CPUs, or with ``WIDESPARSE_CPU_KERNELS=0``,
everything runs ATen's kernels: same values, the speed of before. Under
``torch.compile`` :class:`GELU` is plain ``F.gelu`` (Inductor writes its own kernels).

This module imports nothing of the package (floor 0).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GELU", "gelu", "gelu_backward", "take_columns", "load", "enabled", "gelu_derivative_table"]

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <cstring>

static inline float bf16_to_float(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static inline uint16_t float_to_bf16(float f) {  // round to nearest even, NaN stays NaN (c10::BFloat16's rule)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// out[i] = bf16(float(grad[i]) * table[bits(z[i])]); grad, z: contiguous bfloat16 of one shape; table: 65536 floats
torch::Tensor table_mul_bf16(torch::Tensor grad, torch::Tensor z, torch::Tensor table) {
  TORCH_CHECK(grad.scalar_type() == at::kBFloat16 && z.scalar_type() == at::kBFloat16, "bfloat16 tensors expected");
  TORCH_CHECK(grad.sizes() == z.sizes(), "grad and z shapes differ: ", grad.sizes(), " vs ", z.sizes());
  TORCH_CHECK(table.scalar_type() == at::kFloat && table.numel() == 65536 && table.is_contiguous(),
              "table: 65536 contiguous floats expected");
  auto g = grad.contiguous();
  auto zc = z.contiguous();
  auto out = torch::empty_like(zc);
  const uint16_t* gp = reinterpret_cast<const uint16_t*>(g.data_ptr());
  const uint16_t* zp = reinterpret_cast<const uint16_t*>(zc.data_ptr());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const float* tp = table.data_ptr<float>();
  at::parallel_for(0, zc.numel(), 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) op[i] = float_to_bf16(bf16_to_float(gp[i]) * tp[zp[i]]);
  });
  return out;
}

// out[b, j] = x[b, idx[j]] for 2- or 4-byte elements: four rows per index load (1.7x torch.gather's broadcast-index
// gather on a (128, 8192) bf16 tensor, 0.105 ms against 0.182)
template <typename T>
static void take_columns_rows(const T* xp, T* op, const int32_t* ip, int64_t B, int64_t n, int64_t m) {
  at::parallel_for(0, (B + 3) / 4, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      int64_t b = q * 4;
      if (b + 4 <= B) {
        const T *r0 = xp + b * n, *r1 = r0 + n, *r2 = r1 + n, *r3 = r2 + n;
        T *o0 = op + b * m, *o1 = o0 + m, *o2 = o1 + m, *o3 = o2 + m;
        for (int64_t j = 0; j < m; ++j) {
          const int32_t k = ip[j];
          o0[j] = r0[k]; o1[j] = r1[k]; o2[j] = r2[k]; o3[j] = r3[k];
        }
      } else {
        for (; b < B; ++b) {
          const T* r = xp + b * n;
          T* o = op + b * m;
          for (int64_t j = 0; j < m; ++j) o[j] = r[ip[j]];
        }
      }
    }
  });
}

torch::Tensor take_columns(torch::Tensor x, torch::Tensor idx) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "take_columns: a contiguous 2-D x expected, got sizes ", x.sizes());
  TORCH_CHECK(idx.scalar_type() == at::kInt && idx.dim() == 1 && idx.is_contiguous(),
              "take_columns: a contiguous 1-D int32 index expected");
  const int64_t B = x.size(0), n = x.size(1), m = idx.numel();
  const int32_t* ip = idx.data_ptr<int32_t>();
  for (int64_t j = 0; j < m; ++j)
    TORCH_CHECK(ip[j] >= 0 && ip[j] < n, "take_columns: index ", ip[j], " out of range for ", n, " columns");
  auto out = torch::empty({B, m}, x.options());
  if (x.element_size() == 2) {
    take_columns_rows(reinterpret_cast<const uint16_t*>(x.data_ptr()), reinterpret_cast<uint16_t*>(out.data_ptr()),
                      ip, B, n, m);
  } else if (x.element_size() == 4) {
    take_columns_rows(reinterpret_cast<const uint32_t*>(x.data_ptr()), reinterpret_cast<uint32_t*>(out.data_ptr()),
                      ip, B, n, m);
  } else {
    TORCH_CHECK(false, "take_columns: 2- or 4-byte elements expected, got ", x.element_size());
  }
  return out;
}
"""

_lock = threading.Lock()
_state: dict[str, Any] = {}


def enabled() -> bool:
    """Whether the compiled kernels may be used (``WIDESPARSE_CPU_KERNELS`` is not ``0``)."""
    return os.environ.get("WIDESPARSE_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


# compiled for the vector ISA PyTorch itself dispatches to (one build per ISA, so a shared cache never hands one
# machine another's code); measured with 2 threads on 4.2 M elements: 0.45 ms (x86-64-v4), 0.55 ms (v3), 0.95 ms
# (baseline x86-64, slower than ATen's 0.84 ms, so not used)
_ARCH_FLAGS = {"AVX512": "-march=x86-64-v4", "AVX2": "-march=x86-64-v3"}


def load() -> Any | None:
    """The compiled extension, building it on the first call; ``None`` where disabled, where the CPU has neither
    AVX-512 nor AVX2 (as PyTorch reports it), or where it cannot build (the reason is logged once)."""
    if not enabled():
        return None
    with _lock:
        if "ext" not in _state:
            _state["ext"] = None
            isa = torch.backends.cpu.get_cpu_capability()
            if isa not in _ARCH_FLAGS:
                log.info("widesparse: no CPU kernels for capability %s; using ATen's", isa)
                return None
            try:
                from torch.utils.cpp_extension import load_inline

                log.info("widesparse: compiling the CPU kernels (once; cached under TORCH_EXTENSIONS_DIR)")
                _state["ext"] = load_inline(
                    f"widesparse_cpu_kernels_{isa.lower()}", cpp_sources=_SOURCE,
                    functions=["table_mul_bf16", "take_columns"],
                    extra_cflags=["-O3", "-fopenmp", _ARCH_FLAGS[isa]], extra_ldflags=["-fopenmp"], verbose=False,
                )
            except Exception as exc:  # no compiler, no ninja, no headers: ATen's kernels it is
                log.warning("widesparse: CPU kernels unavailable, using ATen's (%s: %s)", type(exc).__name__, exc)
        return _state["ext"]


def take_columns(x: Tensor, idx: Tensor) -> Tensor | None:
    """``x[:, idx]`` for a contiguous 2-D CPU ``x`` of 2- or 4-byte elements (the RP-Mixer's permutations), by the
    compiled kernel; ``None`` where it does not apply or is not built (the caller then gathers with PyTorch). No
    autograd: callers wrap it (:func:`widesparse.linalg.permute_last`)."""
    if (
        x.device.type != "cpu"
        or x.dim() != 2
        or x.element_size() not in (2, 4)
        or not x.is_contiguous()
        or idx.dim() != 1
        or (x.requires_grad and torch.is_grad_enabled())
    ):
        return None
    ext = load()
    return None if ext is None else ext.take_columns(x, idx.to(device="cpu", dtype=torch.int32).contiguous())


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


class GELU(nn.GELU):
    """:class:`torch.nn.GELU` (same arguments, no parameters) whose bfloat16 CPU backward is :func:`gelu`'s."""

    def forward(self, input: Tensor) -> Tensor:
        return gelu(input, self.approximate)
