"""Permutation gathers on the Mixer's two layouts (widesparse.ops.gathers) against plain indexing."""

from __future__ import annotations

import pytest
import torch

from widesparse.linalg import invert_perm
from widesparse.ops.gathers import compose_gathers, gather_sbc_to_bsc, permute_bsc, permute_sbc

S, B, C = 3, 4, 5


def _perm(seed: int = 0) -> torch.Tensor:
    return torch.randperm(S * C, generator=torch.Generator().manual_seed(seed))


def _reference(x_sbc: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Per example: row-major (S, C) positions gathered by idx -> (B, S*C)."""
    return x_sbc.transpose(0, 1).reshape(B, S * C)[:, idx]


def test_gather_sbc_to_bsc_values_and_gradients():
    idx = _perm()
    x = torch.randn(S, B, C, dtype=torch.float64, requires_grad=True)
    assert torch.equal(gather_sbc_to_bsc(x, idx, invert_perm(idx)), _reference(x, idx))
    assert torch.autograd.gradcheck(lambda t: gather_sbc_to_bsc(t, idx, invert_perm(idx)), (x,))


def test_gather_sbc_to_bsc_casts_in_the_same_pass_and_returns_gradients_in_the_input_dtype():
    idx = _perm(1)
    x = torch.randn(S, B, C, requires_grad=True)
    y = gather_sbc_to_bsc(x, idx, invert_perm(idx), torch.bfloat16)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, _reference(x, idx).to(torch.bfloat16))  # cast then permute == permute then cast
    g = torch.randn(B, S * C, dtype=torch.bfloat16)
    y.backward(g)
    assert x.grad.dtype == torch.float32 and x.grad.is_contiguous()
    expect = torch.zeros(B, S * C)
    expect[:, idx] = g.float()
    assert torch.equal(x.grad, expect.view(B, S, C).transpose(0, 1))


@pytest.mark.parametrize("layout", ["sbc", "bsc"])
def test_permute_layouts_agree_with_indexing(layout: str):
    idx = _perm(2)
    x = torch.randn(S, B, C, dtype=torch.float64, requires_grad=True)
    if layout == "sbc":
        y = permute_sbc(x, idx, None)
        got = y.transpose(0, 1).reshape(B, S * C)
    else:
        y = permute_bsc(x.transpose(0, 1), idx, None)
        got = y.reshape(B, S * C)
    assert y.is_contiguous()
    assert torch.equal(got, _reference(x, idx))
    fn = (lambda t: permute_sbc(t, idx, None)) if layout == "sbc" else (lambda t: permute_bsc(t, idx, None))
    arg = x if layout == "sbc" else x.detach().transpose(0, 1).contiguous().requires_grad_()
    assert torch.autograd.gradcheck(fn, (arg,))


def test_compose_gathers_is_one_gather_for_two():
    a, b = _perm(3), _perm(4)
    z = torch.randn(2, S * C)
    assert torch.equal(z[:, compose_gathers(a, b)], z[:, a][:, b])
    assert compose_gathers(None, b) is b and compose_gathers(a, None) is a and compose_gathers(None, None) is None


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd is returning a function")
# dynamo itself instantiates autograd.Function classes while tracing the gathers (a torch-internal warning)
@pytest.mark.filterwarnings("ignore:<class 'torch.autograd.function.Function'> should not be instantiated")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_cpu_gathers_stay_one_opaque_kernel_call(dtype: torch.dtype):
    """Under torch.compile on the CPU both RP gathers (forward and backward) are the opaque widesparse::gather,
    which Inductor cannot fuse into LayerNorm/GELU as scalar indirect loads; values and gradients unchanged."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    idx = _perm(3)
    x = torch.randn(B, S, C, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()
    backend = AotEagerAndRecordGraphs()
    torch._dynamo.reset()
    f = torch.compile(lambda t: permute_bsc(t, idx, None).sin(), backend=backend, fullgraph=True)
    y = f(x)
    (g,) = torch.autograd.grad(y.float().square().sum(), x)
    y_ref = permute_bsc(x, idx, None).sin()
    (g_ref,) = torch.autograd.grad(y_ref.float().square().sum(), x)
    assert torch.equal(y, y_ref) and torch.equal(g, g_ref)
    for graphs in (backend.fw_graphs, backend.bw_graphs):
        targets = [str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
        assert "widesparse.gather.default" in targets and "aten.gather.default" not in targets, targets
