"""The compiled bfloat16 GELU backward (a table lookup) against ATen's, bit for bit, and its fallbacks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from widesparse import cpu_kernels
from widesparse.cpu_kernels import GELU, gelu, gelu_backward, gelu_derivative_table
from widesparse.models import create_model

BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def ext():
    built = cpu_kernels.load()
    if built is None:
        pytest.skip("the CPU kernels did not build here (no C++ compiler / ninja, or neither AVX-512 nor AVX2)")
    return built


def all_bf16_values() -> torch.Tensor:
    return torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(BF16)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    both_nan = a.isnan() & b.isnan()
    return bool(((a.view(torch.int16) == b.view(torch.int16)) | both_nan).all())


def test_derivative_table_is_aten_gelu_backward_at_every_bf16_value():
    table = gelu_derivative_table()
    values = all_bf16_values()
    assert table.dtype == torch.float32 and table.shape == (1 << 16,)
    # index = the 16 bits read as unsigned
    idx = values.view(torch.int16).to(torch.int32) & 0xFFFF
    ref = torch.ops.aten.gelu_backward(torch.ones(1 << 16), values.float())
    assert torch.equal(table[idx.long()].nan_to_num(7.0), ref.nan_to_num(7.0))


@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e3, 1e30])
def test_table_backward_matches_aten_bit_for_bit_on_every_bf16_input(ext, scale):
    g = torch.Generator().manual_seed(int(scale) % 97)
    z = all_bf16_values()
    grad = (torch.randn(z.shape, generator=g) * scale).to(BF16)
    assert same_bits(gelu_backward(grad, z), torch.ops.aten.gelu_backward(grad, z))


def test_table_backward_takes_strided_inputs_and_checks_shapes(ext):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(96, 80, generator=g).to(BF16).t()
    grad = torch.randn(96, 80, generator=g).to(BF16).t()
    out = gelu_backward(grad, z)
    assert out.shape == (80, 96)
    assert same_bits(out, torch.ops.aten.gelu_backward(grad.contiguous(), z.contiguous()))
    with pytest.raises(RuntimeError, match="shapes differ"):
        ext.table_mul_bf16(grad, z[:3], gelu_derivative_table())


def test_gelu_module_is_nn_gelu_with_the_table_backward_in_bf16(ext):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(33, 65, generator=g) * 3).to(BF16).requires_grad_()
    gy = torch.randn(33, 65, generator=g).to(BF16)
    act = GELU()
    assert isinstance(act, nn.GELU)
    y = act(x)
    assert type(y.grad_fn).__name__ == "_GeluBackward"
    assert same_bits(y, F.gelu(x))
    (gx,) = torch.autograd.grad(y, x, gy)
    (ref,) = torch.autograd.grad(F.gelu(x), x, gy)
    assert same_bits(gx, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_other_dtypes_and_the_tanh_form_run_atens_gelu(dtype):
    x = torch.randn(4, 5, dtype=dtype, requires_grad=True)
    assert type(gelu(x).grad_fn).__name__ == "GeluBackward0"
    xb = torch.randn(4, 5).to(BF16).requires_grad_()
    assert type(gelu(xb, "tanh").grad_fn).__name__ == "GeluBackward0"
    assert type(GELU(approximate="tanh")(xb).grad_fn).__name__ == "GeluBackward0"
    with torch.no_grad():
        assert gelu(xb).grad_fn is None


def test_double_backward_through_the_bf16_path(ext):
    x = torch.randn(6, 7).to(BF16).requires_grad_()
    (g1,) = torch.autograd.grad(GELU()(x).sum(), x, create_graph=True)
    (ref1,) = torch.autograd.grad(F.gelu(x).sum(), x, create_graph=True)
    (g2,) = torch.autograd.grad(g1.sum(), x)
    (ref2,) = torch.autograd.grad(ref1.sum(), x)
    assert same_bits(g1, ref1) and same_bits(g2, ref2)


def test_disabled_by_environment_variable(monkeypatch):
    monkeypatch.setenv("WIDESPARSE_CPU_KERNELS", "0")
    assert not cpu_kernels.enabled() and cpu_kernels.load() is None
    xb = torch.randn(4, 5).to(BF16).requires_grad_()
    assert type(gelu(xb).grad_fn).__name__ == "GeluBackward0"


def test_unsupported_cpu_capability_falls_back_to_aten(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert cpu_kernels.load() is None
    xb = torch.randn(4, 5).to(BF16).requires_grad_()
    assert type(gelu(xb).grad_fn).__name__ == "GeluBackward0"


def test_build_failure_is_logged_and_falls_back(monkeypatch, caplog):
    import torch.utils.cpp_extension as cpp

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(cpp, "load_inline", broken)
    with caplog.at_level("WARNING", logger="widesparse.cpu_kernels"):
        assert cpu_kernels.load() is None
    assert "no compiler here" in caplog.text


def test_mixer_bf16_training_step_is_bit_identical_with_and_without_the_kernels(ext, monkeypatch):
    """The Mixer family's default activation is :class:`GELU`: a bf16 autocast step gives the same gradients."""
    torch.manual_seed(0)
    model = create_model("mixer", image_size=16, patch_size=4, in_chans=3, num_classes=5, dim=32, depth=2)
    assert any(type(m) is GELU for m in model.modules())
    x = torch.randn(6, 3, 16, 16)
    y = torch.randint(0, 5, (6,))

    def grads():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=BF16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    fast = grads()
    monkeypatch.setenv("WIDESPARSE_CPU_KERNELS", "0")
    slow = grads()
    assert all(torch.equal(a, b) for a, b in zip(fast, slow, strict=True))


@pytest.mark.parametrize("dtype", [BF16, torch.float16, torch.float32, torch.int32])
@pytest.mark.parametrize("rows", [1, 3, 4, 9])
def test_take_columns_is_indexing_for_any_rows_and_index(ext, dtype, rows):
    g = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, 50, generator=g) * 100).to(dtype)
    empty = torch.tensor([], dtype=torch.long)
    for idx in (torch.randperm(50, generator=g), torch.randint(0, 50, (17,), generator=g), empty):
        out = cpu_kernels.take_columns(x, idx)
        assert out is not None and out.dtype == dtype and out.shape == (rows, idx.numel())
        assert torch.equal(out, x[:, idx])


def test_take_columns_refuses_out_of_range_and_declines_what_it_does_not_cover(ext):
    x = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match="index 6 out of range for 6 columns"):
        cpu_kernels.take_columns(x, torch.tensor([0, 6]))
    assert cpu_kernels.take_columns(x.double(), torch.tensor([0])) is None  # 8-byte elements
    assert cpu_kernels.take_columns(x.t(), torch.tensor([0])) is None  # not contiguous
    assert cpu_kernels.take_columns(x[None], torch.tensor([0])) is None  # not 2-D
    assert cpu_kernels.take_columns(x.requires_grad_(), torch.tensor([0])) is None  # would lose the graph


def test_permute_last_runs_the_column_kernel_and_keeps_its_gradient(ext, monkeypatch):
    from widesparse import linalg

    calls = []
    real = linalg.take_columns
    monkeypatch.setattr(linalg, "take_columns", lambda x, i: calls.append(x.dtype) or real(x, i))
    g = torch.Generator().manual_seed(3)
    perm = torch.randperm(40, generator=g)
    for dtype in (BF16, torch.float32):
        x = torch.randn(8, 40, generator=g).to(dtype).requires_grad_()
        y = linalg.permute_last(x, perm)
        gy = torch.randn(8, 40, generator=g).to(dtype)
        (gx,) = torch.autograd.grad(y, x, gy)
        assert torch.equal(y, x[:, perm]) and torch.equal(gx[:, perm], gy)
    assert calls == [BF16, BF16, torch.float32, torch.float32]  # forward and backward gathers
