"""The compiled CPU kernels against ATen's: the bf16 GELU backward bit for bit, column gathers, bf16 LayerNorm,
and the fallbacks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import widesparse.ops.cpu_kernels as cpu_kernels
from widesparse.layers.activation import GELU
from widesparse.layers.norm import LayerNorm
from widesparse.models import create_model
from widesparse.ops.cpu_kernels import gelu, gelu_backward, gelu_derivative_table

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
    with caplog.at_level("WARNING", logger="widesparse.ops.cpu_kernels"):
        assert cpu_kernels.load() is None
    assert "no compiler here" in caplog.text


def test_mixer_bf16_training_step_with_and_without_the_kernels(ext, monkeypatch):
    """The Mixer family's default activation and norm are :class:`GELU` and :class:`LayerNorm`: a bf16 autocast
    step takes the kernels and gives the gradients of ATen's kernels up to bf16 rounding."""
    torch.manual_seed(0)
    model = create_model("mixer", image_size=16, patch_size=4, in_chans=3, num_classes=5, dim=32, depth=2)
    assert any(type(m) is GELU for m in model.modules()) and any(type(m) is LayerNorm for m in model.modules())
    x = torch.randn(6, 3, 16, 16)
    y = torch.randint(0, 5, (6,))
    seen = set()
    model.blocks[0].norm1.register_forward_hook(lambda m, i, o: seen.add(type(o.grad_fn).__name__))

    def grads():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=BF16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    fast = grads()
    monkeypatch.setenv("WIDESPARSE_CPU_KERNELS", "0")
    slow = grads()
    assert seen == {"_LayerNormBackward", "NativeLayerNormBackward0"}
    for a, b in zip(fast, slow, strict=True):
        assert torch.allclose(a, b, rtol=0.02, atol=0.02 * float(b.abs().max()))


def ln_pair(n: int, seed: int = 0) -> tuple[LayerNorm, nn.LayerNorm]:
    ours, ref = LayerNorm(n, eps=1e-6), nn.LayerNorm(n, eps=1e-6)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(n, generator=g))
        ours.bias.copy_(torch.randn(n, generator=g))
    ref.load_state_dict(ours.state_dict())
    return ours, ref


@pytest.mark.parametrize("n", [128, 48, 20, 1])
def test_layer_norm_matches_aten_and_float64(ext, n):
    """Rows of 128 and 48 take the AVX-512 loop where built, 20 and 1 the generic one."""
    g = torch.Generator().manual_seed(n)
    rows = 2048
    x = (torch.randn(rows, n, generator=g) * 3 + 1).to(BF16).requires_grad_()
    gy = torch.randn(rows, n, generator=g).to(BF16)
    ours, ref = ln_pair(n)
    y, y_ref = ours(x), ref(x)
    assert type(y.grad_fn).__name__ == "_LayerNormBackward" and y.dtype == BF16
    # within one bf16 rounding step of ATen's (the statistics are summed in another order)
    assert (y.float() - y_ref.float()).abs().max() <= 2 ** -7 * y_ref.float().abs().max()
    assert (y.view(torch.int16) != y_ref.view(torch.int16)).float().mean() < 1e-2
    got = torch.autograd.grad(y, (x, ours.weight, ours.bias), gy)
    (gx_aten,) = torch.autograd.grad(y_ref, x, gy)
    xd = x.detach().double().requires_grad_()
    wd, bd = ours.weight.detach().double().requires_grad_(), ours.bias.detach().double().requires_grad_()
    ref64 = torch.autograd.grad(F.layer_norm(xd, (n,), wd, bd, 1e-6), (xd, wd, bd), gy.double())
    assert got[0].dtype == BF16 and got[1].dtype == got[2].dtype == torch.float32
    if n > 1:  # (a single-element row has a zero input gradient)
        assert (got[0].float() - gx_aten.float()).abs().max() <= 0.02 * gx_aten.float().abs().max()
    for a, r in zip(got[1:], ref64[1:], strict=True):  # float32 sums of exact bf16 products
        assert (a.double() - r).abs().max() <= 1e-5 * r.abs().max() + 1e-6


def test_layer_norm_falls_back_to_aten_where_the_kernel_does_not_apply(ext):
    ours, _ = ln_pair(16)
    for x in (torch.randn(4, 16, requires_grad=True), torch.randn(4, 16, dtype=torch.float64, requires_grad=True)):
        assert type(ours.to(x.dtype)(x).grad_fn).__name__ == "NativeLayerNormBackward0"
    ours = ours.float()
    xb = torch.randn(4, 16).to(BF16).requires_grad_()
    assert type(ours(xb).grad_fn).__name__ == "_LayerNormBackward"
    assert type(LayerNorm(16, elementwise_affine=False)(xb).grad_fn).__name__ == "NativeLayerNormBackward0"
    assert type(LayerNorm((2, 8))(xb.view(4, 2, 8)).grad_fn).__name__ == "NativeLayerNormBackward0"
    assert type(ours.to(BF16)(xb).grad_fn).__name__ == "NativeLayerNormBackward0"  # bf16 parameters
    big = torch.randn(2, 4097).to(BF16).requires_grad_()
    assert type(LayerNorm(4097)(big).grad_fn).__name__ == "NativeLayerNormBackward0"


def test_layer_norm_state_dict_and_double_backward(ext):
    ours, ref = ln_pair(32, seed=5)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(64, 32).to(BF16).requires_grad_()
    (g1,) = torch.autograd.grad(ours(x).pow(2).sum(), x, create_graph=True)
    (g2,) = torch.autograd.grad(g1.float().sum(), x)
    (r1,) = torch.autograd.grad(ref(x).pow(2).sum(), x, create_graph=True)
    (r2,) = torch.autograd.grad(r1.float().sum(), x)
    g1, r1 = g1.detach(), r1.detach()
    assert torch.allclose(g1.float(), r1.float(), rtol=0.05, atol=0.05 * float(r1.float().abs().max()))
    assert torch.allclose(g2.float(), r2.float(), rtol=0.05, atol=0.05 * float(r2.float().abs().max()))


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


def test_permute_last_is_one_compiled_autograd_function_differentiable_to_any_order(ext):
    from widesparse.ops import gathers

    g = torch.Generator().manual_seed(3)
    perm = torch.randperm(40, generator=g)
    for dtype in (BF16, torch.float32):
        for idx in (perm, perm.to(torch.int32)):
            x = torch.randn(2, 4, 40, generator=g).to(dtype).requires_grad_()
            y = gathers.permute_last(x, idx)
            assert type(y.grad_fn).__name__ == "CppFunction" and torch.equal(y, x[..., perm])
            gy = torch.randn(2, 4, 40, generator=g).to(dtype).requires_grad_()
            (gx,) = torch.autograd.grad(y, x, gy, create_graph=True)
            assert torch.equal(gx[..., perm], gy)
            (ggy,) = torch.autograd.grad(gx, gy, torch.ones_like(gx))  # the backward is a permutation too
            assert torch.equal(ggy, torch.ones_like(gy))
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)  # 8-byte elements: the PyTorch gather
    assert type(gathers.permute_last(x, torch.randperm(5)).grad_fn).__name__ == "_PermuteBackward"
    with pytest.raises(RuntimeError, match="permutations of x's last axis"):
        gathers.permute_last(torch.randn(3, 5), torch.randperm(4), torch.randperm(4))


def test_the_sbc_gathers_run_the_column_kernel(ext, monkeypatch):
    from widesparse import linalg
    from widesparse.ops import gathers
    from widesparse.ops.gathers import gather_sbc_to_bsc

    calls = []
    real = gathers.take_columns
    monkeypatch.setattr(gathers, "take_columns", lambda x, i: calls.append(x.dtype) or real(x, i))
    S, B, C = 4, 3, 5
    idx = torch.randperm(S * C)
    x = torch.randn(S, B, C, requires_grad=True)
    y = gather_sbc_to_bsc(x, idx, linalg.invert_perm(idx), BF16)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    ref = x.detach().transpose(0, 1).reshape(B, S * C)[:, idx].to(BF16)
    assert torch.equal(y, ref) and torch.equal(gx, torch.ones_like(x))
    assert calls == [BF16, BF16]  # forward and backward gathers


def affine(norm: nn.LayerNorm) -> tuple:
    return norm.weight, norm.bias, norm.eps


@pytest.mark.parametrize("rows_per_example", [1, 4])
def test_permuted_layer_norm_is_layer_norm_then_the_permutation(ext, rows_per_example):
    g = torch.Generator().manual_seed(rows_per_example)
    B, C = 5, 48
    P = rows_per_example * C
    ours, _ = ln_pair(C, seed=7)
    x = (torch.randn(B, rows_per_example, C, generator=g) * 2).to(BF16).requires_grad_()
    perm = torch.randperm(P, generator=g)
    inv = torch.argsort(perm)
    y = cpu_kernels.permuted_layer_norm(x, *affine(ours), perm, inv)
    ref = ours(x).reshape(B, P)[:, perm]
    assert y.shape == (B, P) and torch.equal(y, ref)
    gy = torch.randn(B, P, generator=g).to(BF16)
    got = torch.autograd.grad(y, (x, ours.weight, ours.bias), gy, retain_graph=True)
    want = torch.autograd.grad(ref, (x, ours.weight, ours.bias), gy)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    # create_graph: ATen's differentiable backward, through the inverse permutation
    got2 = torch.autograd.grad(y, x, gy, create_graph=True)[0]
    assert torch.allclose(got2.float(), want[0].float(), atol=0.02 * float(want[0].float().abs().max()))


def test_permuted_layer_norm_declines_or_refuses_what_it_does_not_cover(ext):
    ours, ref = ln_pair(16)
    x = torch.randn(2, 3, 16).to(BF16)
    perm = torch.randperm(48)
    inv = torch.argsort(perm)
    assert cpu_kernels.permuted_layer_norm(x.float(), *affine(ours), perm, inv) is None  # float32 x
    assert cpu_kernels.permuted_layer_norm(x, *affine(ours), perm.int(), inv.int()) is None  # int32 index
    assert cpu_kernels.permuted_layer_norm(x, *affine(ours), perm[:40], inv[:40]) is None  # not whole examples
    with pytest.raises(RuntimeError, match="whole rows of each example"):
        cpu_kernels.permuted_layer_norm(x, *affine(ours), torch.randperm(24), torch.randperm(24))
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_kernels.permuted_layer_norm(x, *affine(ours), perm, inv + 1)


def test_rp_mixer_fuses_layer_norm_and_j1_in_bf16_and_keeps_hooks(ext, monkeypatch):
    from widesparse.ops import mixer as ops_mixer

    torch.manual_seed(0)
    model = create_model("rp_mixer", image_size=16, patch_size=4, in_chans=3, num_classes=5, dim=32, depth=2)
    model.layout = "bsc"
    x = torch.randn(4, 3, 16, 16)
    calls = []
    real = ops_mixer.permuted_layer_norm
    monkeypatch.setattr(ops_mixer, "permuted_layer_norm", lambda *a: calls.append(1) or real(*a))
    with torch.autocast("cpu", dtype=BF16):
        fused = model(x)
    assert len(calls) == 4  # two blocks, two sublayers each
    monkeypatch.setattr(ops_mixer, "permuted_layer_norm", lambda *a: None)
    with torch.autocast("cpu", dtype=BF16):
        plain = model(x)
    assert torch.equal(fused, plain)
    seen = []
    model.blocks[0].mlp_tokens.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    monkeypatch.setattr(ops_mixer, "permuted_layer_norm", lambda *a: calls.append(1) or real(*a))
    calls.clear()
    with torch.autocast("cpu", dtype=BF16):  # the hooked sublayer runs its module call: the plain math
        assert torch.allclose(model(x).float(), fused.float(), rtol=0, atol=0.02 * fused.abs().max().item())
    assert len(seen) == 1 and len(calls) == 3


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch, caplog):
    import os
    import time

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    from torch.utils.cpp_extension import _get_build_directory

    lock = tmp_path / "some_ext" / "lock"
    lock.parent.mkdir()
    lock.touch()
    assert Path(_get_build_directory("some_ext", False)) == lock.parent
    cpu_kernels._remove_stale_lock("some_ext")
    assert lock.exists()  # a build may be running
    old = time.time() - 3600
    os.utime(lock, (old, old))
    with caplog.at_level("WARNING", logger="widesparse.ops.cpu_kernels"):
        cpu_kernels._remove_stale_lock("some_ext")
    assert not lock.exists() and "stale build lock" in caplog.text


@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_permute_add_is_the_residual_plus_the_permuted_output(ext, dtype):
    g = torch.Generator().manual_seed(11)
    B, S, C = 7, 4, 10  # 7 rows: a block of four and three single rows
    h = torch.randn(B, S * C, generator=g).to(dtype).requires_grad_()
    r = torch.randn(B, S, C, generator=g).to(dtype).requires_grad_()
    perm = torch.randperm(S * C, generator=g)
    y = cpu_kernels.permute_add(h, perm, torch.argsort(perm), r)
    ref = r + h[:, perm].view(B, S, C)
    assert y.shape == (B, S, C) and torch.equal(y, ref)  # one rounding of the float32 sum, as ATen's add
    gy = torch.randn(B, S, C, generator=g).to(dtype)
    got, want = torch.autograd.grad(y, (h, r), gy), torch.autograd.grad(ref, (h, r), gy)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert cpu_kernels.permute_add(h, perm, torch.argsort(perm), r.double()) is None  # mixed dtypes
    assert cpu_kernels.permute_add(h.half(), perm, torch.argsort(perm), r.half()) is None  # float16
    with pytest.raises(RuntimeError, match="whole rows"):
        cpu_kernels.permute_add(h, torch.arange(3), torch.arange(3), r)


@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_rp_mixer_joins_j2_and_the_residual_add(ext, dtype, monkeypatch):
    from widesparse.ops import mixer as ops_mixer

    torch.manual_seed(1)
    model = create_model("rp_mixer", image_size=16, patch_size=4, in_chans=3, num_classes=5, dim=32, depth=2)
    model = model.to(dtype)
    model.layout = "bsc"
    x = torch.randn(4, 3, 16, 16, dtype=dtype)
    calls = []
    real = ops_mixer.permute_add
    monkeypatch.setattr(ops_mixer, "permute_add", lambda *a: calls.append(1) or real(*a))
    fused = model(x)
    g_fused = torch.autograd.grad(fused.float().square().sum(), list(model.parameters()))
    assert len(calls) == 4
    monkeypatch.setattr(ops_mixer, "permute_add", lambda *a: None)
    plain = model(x)
    g_plain = torch.autograd.grad(plain.float().square().sum(), list(model.parameters()))
    assert torch.equal(fused, plain)
    assert all(torch.equal(a, b) for a, b in zip(g_fused, g_plain, strict=True))


def test_status_reports_what_runs(ext, monkeypatch):
    st = cpu_kernels.status()
    assert st == {"enabled": True, "isa": torch.backends.cpu.get_cpu_capability(), "built": True}
    monkeypatch.setenv("WIDESPARSE_CPU_KERNELS", "off")
    assert cpu_kernels.status()["enabled"] is False and cpu_kernels.status()["built"] is False
