"""Tests of widesparse.layers (PermutedKronLinear, StructuredLinear) and models.blocks.MixingMlp.

docs/theory.md (5), (6), (14), §3.5, §3.10 and §4.3. Oracles are built from the layers' parameters and permutation
buffers only: Kronecker products with ``torch.kron``, permutation matrices entry by entry, vec by explicit loops.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from widesparse.layers import PermutedKronLinear, StructuredLinear
from widesparse.linalg import apply_perm, apply_permuted_kron, random_perm, unvec, vec
from widesparse.models.blocks import MixerBlock, MixingMlp

F64 = torch.float64
TOL = {"rtol": 0.0, "atol": 1e-12}


pytestmark = pytest.mark.usefixtures("single_thread")


# --------------------------------------------------------------------------------------------------------------
# independent oracles
# --------------------------------------------------------------------------------------------------------------
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=dtype)


def eye(n: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.eye(n, dtype=dtype)


def kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Differentiable ``a ⊗ b`` (contiguous copies: torch 2.13's kron raises on some non-contiguous inputs)."""
    return torch.kron(a.contiguous(), b.contiguous())


def perm_matrix_loop(perm: torch.Tensor | None, n: int) -> torch.Tensor:
    """``J`` with ``(J x)[i] = x[perm[i]]``, entry by entry; identity for ``None``."""
    J = torch.zeros(n, n, dtype=F64)
    for i in range(n):
        J[i, i if perm is None else int(perm[i])] = 1.0
    return J


def vec_loop(x: torch.Tensor) -> torch.Tensor:
    *lead, S, C = x.shape
    flat = x.reshape(-1, S, C)
    out = torch.empty(flat.shape[0], S * C, dtype=x.dtype)
    for b, s, c in itertools.product(range(flat.shape[0]), range(S), range(C)):
        out[b, s + c * S] = flat[b, s, c]
    return out.reshape(*lead, S * C)


def unvec_loop(v: torch.Tensor, S: int, C: int) -> torch.Tensor:
    *lead, n = v.shape
    flat = v.reshape(-1, n)
    out = torch.empty(flat.shape[0], S, C, dtype=v.dtype)
    for b, s, c in itertools.product(range(flat.shape[0]), range(S), range(C)):
        out[b, s, c] = flat[b, s + c * S]
    return out.reshape(*lead, S, C)


def dense_oracle(layer: PermutedKronLinear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(J_2 B J_1, J_2 b_eff)`` built differentiably from ``layer.weight``/``layer.bias`` (float64)."""
    A = layer.weight.to(F64)
    k = layer.k
    J1 = perm_matrix_loop(layer.perm_in, layer.in_features)
    J2 = perm_matrix_loop(layer.perm_out, layer.out_features)
    B = kron(eye(k), A) if layer.blocks == "contiguous" else kron(A, eye(k))
    W = J2 @ B @ J1
    if layer.bias is None:
        return W, None
    b = layer.bias.to(F64)
    ones = torch.ones(k, dtype=F64)
    beff = kron(ones, b) if layer.blocks == "contiguous" else kron(b, ones)
    return W, J2 @ beff


def oracle_forward(layer: PermutedKronLinear, x: torch.Tensor) -> torch.Tensor:
    W, b = dense_oracle(layer)
    y = x @ W.T
    return y if b is None else y + b


# (in_block q, out_block p, k): A is p x q; expansions p/q != 1 both ways and one square
SHAPES = [(3, 7, 5), (6, 2, 4), (4, 4, 3)]
BLOCKS = ["contiguous", "interleaved"]
PERMS = [(None, None), ("random", "random"), ("random", None), (None, "random")]


def make(q, p, k, blocks="contiguous", perms=(None, None), bias=True, seed=0, dtype=F64):
    """A layer whose weight init (global RNG) and permutations (``seed``) are both deterministic."""
    torch.manual_seed(1000 + seed)
    return PermutedKronLinear(
        q, p, k, bias=bias, blocks=blocks, perm_in=perms[0], perm_out=perms[1], seed=seed, dtype=dtype
    )


# --------------------------------------------------------------------------------------------------------------
# PermutedKronLinear: forward, dense forms, gradients
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("q,p,k", SHAPES)
@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("perms", PERMS)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_dense_forms(q, p, k, blocks, perms, bias):
    layer = make(q, p, k, blocks, perms, bias)
    assert (layer.in_features, layer.out_features) == (k * q, k * p)
    x = randn(2, 3, k * q, seed=1)
    y = layer(x)
    assert y.shape == (2, 3, k * p)
    W, b = dense_oracle(layer)
    expected = x @ W.T + (0 if b is None else b)
    torch.testing.assert_close(y, expected, **TOL)
    torch.testing.assert_close(layer.dense_forward(x), expected, **TOL)
    weff, beff = layer.effective_weight(), layer.effective_bias()
    assert weff.shape == (k * p, k * q)
    torch.testing.assert_close(weff, W.detach(), **TOL)
    if bias:
        torch.testing.assert_close(beff, b.detach(), **TOL)
    else:
        assert beff is None
    torch.testing.assert_close(x @ weff.T + (0 if beff is None else beff), y, **TOL)
    # unbatched input
    torch.testing.assert_close(layer(x[0, 0]), expected[0, 0], **TOL)


@pytest.mark.parametrize("q,p,k", SHAPES)
@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("perms", PERMS)
@pytest.mark.parametrize("bias", [True, False])
def test_gradients_match_dense_oracle(q, p, k, blocks, perms, bias):
    layer = make(q, p, k, blocks, perms, bias)
    x = randn(4, k * q, seed=2).requires_grad_(True)
    g = randn(4, k * p, seed=3)

    (layer(x) * g).sum().backward()
    fast = [layer.weight.grad.clone(), x.grad.clone()] + ([layer.bias.grad.clone()] if bias else [])
    layer.zero_grad(set_to_none=True)
    x.grad = None

    (oracle_forward(layer, x) * g).sum().backward()
    slow = [layer.weight.grad, x.grad] + ([layer.bias.grad] if bias else [])
    for a, b in zip(fast, slow, strict=True):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("q,p,k", SHAPES)
def test_contiguous_without_perms_is_identity_kron_a(q, p, k):
    layer = make(q, p, k, "contiguous")
    A = layer.weight.detach()
    W = layer.effective_weight()
    assert torch.equal(W, kron(eye(k), A))
    for i, j in itertools.product(range(k), range(k)):
        block = W[i * p : (i + 1) * p, j * q : (j + 1) * q]
        assert torch.equal(block, A if i == j else torch.zeros_like(A))
    assert layer.canonical_perms() == (None, None)
    # on x = vec X with X of shape (q, k): vec(A X) (docs/theory.md (5), token mixing with k = C)
    X = randn(2, q, k, seed=4)
    torch.testing.assert_close(layer(vec_loop(X)), vec_loop(A @ X + layer.bias.detach()[:, None]), **TOL)


@pytest.mark.parametrize("q,p,k", SHAPES)
@pytest.mark.parametrize("perms", PERMS)
def test_interleaved_is_a_kron_identity_and_its_canonical_form(q, p, k, perms):
    layer = make(q, p, k, "interleaved", perms, seed=3)
    A, b = layer.weight.detach(), layer.bias.detach()
    J1 = perm_matrix_loop(layer.perm_in, k * q)
    J2 = perm_matrix_loop(layer.perm_out, k * p)
    W = layer.effective_weight()
    torch.testing.assert_close(W, J2 @ kron(A, eye(k)) @ J1, **TOL)
    if perms == (None, None):
        assert torch.equal(W, kron(A, eye(k)))
        # on x = vec X with X of shape (k, q): vec(X A^T) (docs/theory.md (6), channel mixing with k = S, A = V^T)
        X = randn(2, k, q, seed=5)
        torch.testing.assert_close(layer(vec_loop(X)), vec_loop(X @ A.T + b), **TOL)
    # docs/theory.md (14): J_2' (I_k ⊗ A) J_1' with the commutations folded into the permutations
    pi1, pi2 = layer.canonical_perms()
    assert pi1 is not None and pi2 is not None  # interleaved blocks always need K_{k,q}, K_{p,k} (p, q > 1)
    P1, P2 = perm_matrix_loop(pi1, k * q), perm_matrix_loop(pi2, k * p)
    torch.testing.assert_close(P2 @ kron(eye(k), A) @ P1, W, **TOL)
    x = randn(3, k * q, seed=6)
    canon = apply_permuted_kron(A, x, k, pi1, pi2) + apply_perm(kron(torch.ones(k, dtype=F64), b), pi2)
    torch.testing.assert_close(layer(x), canon, **TOL)


@pytest.mark.parametrize("q,p,k", SHAPES)
@pytest.mark.parametrize("perms", PERMS)
def test_contiguous_canonical_perms_are_the_buffers(q, p, k, perms):
    layer = make(q, p, k, "contiguous", perms)
    pi1, pi2 = layer.canonical_perms()
    for got, buf in ((pi1, layer.perm_in), (pi2, layer.perm_out)):
        assert (got is None) == (buf is None)
        if got is not None:
            assert torch.equal(got, buf)


@pytest.mark.parametrize("q,p,k", SHAPES)
@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("perms", PERMS)
@pytest.mark.parametrize("bias", [True, False])
def test_generic_effective_weight_agrees_with_closed_form(q, p, k, blocks, perms, bias):
    layer = make(q, p, k, blocks, perms, bias, seed=4)
    generic = StructuredLinear.effective_weight(layer, torch.float64)
    closed = layer.effective_weight(torch.float64)
    torch.testing.assert_close(generic, closed, **TOL)
    torch.testing.assert_close(generic, dense_oracle(layer)[0].detach(), **TOL)
    torch.testing.assert_close(StructuredLinear.effective_weight(layer), closed, **TOL)  # default dtype = params'


@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("perms", PERMS)
def test_float32_layer_float64_effective_weight(blocks, perms):
    layer = make(3, 7, 5, blocks, perms, dtype=torch.float32)
    assert layer.weight.dtype == torch.float32
    assert layer.effective_weight().dtype == torch.float32
    w64, b64 = layer.effective_weight(torch.float64), layer.effective_bias(torch.float64)
    assert w64.dtype == F64 and b64.dtype == F64
    W, b = dense_oracle(layer)  # casts the float32 parameters to float64 (exact)
    torch.testing.assert_close(w64, W.detach(), **TOL)
    torch.testing.assert_close(b64, b.detach(), **TOL)
    generic = StructuredLinear.effective_weight(layer, torch.float64)
    assert generic.dtype == F64
    torch.testing.assert_close(generic, w64, **TOL)
    assert layer.weight.dtype == torch.float32  # the generic path must not cast the layer itself
    x = randn(2, 15, seed=7)
    torch.testing.assert_close(layer.dense_forward(x), x @ W.detach().T + b.detach(), **TOL)


@pytest.mark.parametrize("q,p,k", SHAPES)
@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("perms", [(None, None), ("random", "random")])
def test_connections_and_density(q, p, k, blocks, perms):
    layer = make(q, p, k, blocks, perms)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(p, q, generator=gen(8), dtype=F64) + 0.5)  # no zero entries
    W = layer.effective_weight()
    assert layer.connections == int((W != 0).sum()) == k * p * q
    assert layer.density == pytest.approx(1 / k, rel=1e-15)
    # docs/theory.md §3.5: q non-zeros per row, p per column
    assert torch.equal((W != 0).sum(1), torch.full((k * p,), q))
    assert torch.equal((W != 0).sum(0), torch.full((k * q,), p))
    assert sum(t.numel() for t in layer.parameters()) == p * q + p


# --------------------------------------------------------------------------------------------------------------
# random permutations: persistent, seeded, spectrum-preserving
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("blocks", BLOCKS)
def test_random_perms_are_persistent_buffers(blocks):
    a = make(3, 7, 5, blocks, ("random", "random"), seed=0)
    b = make(3, 7, 5, blocks, ("random", "random"), seed=10)
    assert not torch.equal(a.perm_in, b.perm_in)
    assert not torch.equal(a.perm_out, b.perm_out)
    sd = a.state_dict()
    assert {"perm_in", "perm_out"} <= set(sd)
    assert sd["perm_in"].dtype == torch.int64 and sd["perm_out"].dtype == torch.int64
    assert all(t.dtype.is_floating_point for t in a.parameters())  # perms are not trainable parameters
    x = randn(4, 15, seed=9)
    assert not torch.allclose(a(x), b(x))
    b.load_state_dict(sd)
    assert torch.equal(b.perm_in, a.perm_in) and torch.equal(b.perm_out, a.perm_out)
    assert torch.equal(b(x), a(x))
    # identity-perm layers store no permutation
    c = make(3, 7, 5, blocks)
    assert c.perm_in is None and c.perm_out is None
    assert not {"perm_in", "perm_out"} & set(c.state_dict())


def test_same_seed_same_perms_independent_of_global_rng():
    torch.manual_seed(0)
    a = PermutedKronLinear(3, 7, 5, perm_in="random", perm_out="random", seed=42, dtype=F64)
    torch.manual_seed(1)
    b = PermutedKronLinear(3, 7, 5, perm_in="random", perm_out="random", seed=42, dtype=F64)
    assert not torch.equal(a.weight, b.weight)  # the weight init does use the global RNG...
    assert torch.equal(a.perm_in, b.perm_in)  # ...the permutations do not
    assert torch.equal(a.perm_out, b.perm_out)
    # documented seeding: perm_in from (seed, 0), perm_out from (seed, 1), independent streams
    assert torch.equal(a.perm_in, random_perm(15, (42, 0)))
    assert torch.equal(a.perm_out, random_perm(35, (42, 1)))
    assert not torch.equal(random_perm(35, (42, 1)), random_perm(35, (43, 0)))
    for perm, n in ((a.perm_in, 15), (a.perm_out, 35)):
        assert sorted(perm.tolist()) == list(range(n))


def test_identity_string_and_explicit_tensor_perms():
    assert make(3, 7, 5, perms=("identity", "identity")).perm_in is None
    pin, pout = random_perm(15, 100), random_perm(35, 101)
    layer = make(3, 7, 5, "interleaved", (pin, pout))
    assert torch.equal(layer.perm_in, pin) and torch.equal(layer.perm_out, pout)
    x = randn(2, 15, seed=11)
    torch.testing.assert_close(layer(x), oracle_forward(layer, x).detach(), **TOL)
    # a list is accepted too
    layer2 = make(3, 7, 5, "interleaved", (pin.tolist(), pout.tolist()))
    assert torch.equal(layer2.perm_in, pin) and layer2.perm_in.dtype == torch.int64


@pytest.mark.parametrize("q,p,k", SHAPES)
@pytest.mark.parametrize("blocks", BLOCKS)
def test_random_perms_preserve_singular_values(q, p, k, blocks):
    plain = make(q, p, k, blocks)
    rp = make(q, p, k, blocks, ("random", "random"), seed=7)
    rp.load_state_dict({**rp.state_dict(), "weight": plain.weight, "bias": plain.bias})
    W_plain, W_rp = plain.effective_weight(), rp.effective_weight()
    assert not torch.allclose(W_plain, W_rp)
    sv_plain, sv_rp = torch.linalg.svdvals(W_plain), torch.linalg.svdvals(W_rp)
    torch.testing.assert_close(sv_rp, sv_plain, rtol=0, atol=1e-10)
    # I_k ⊗ A and A ⊗ I_k have the singular values of A, each k times
    sv_a = torch.linalg.svdvals(plain.weight.detach())
    torch.testing.assert_close(sv_plain, sv_a.repeat_interleave(k), rtol=0, atol=1e-10)


# --------------------------------------------------------------------------------------------------------------
# argument validation
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"blocks": "foo"}, r"blocks must be 'contiguous' or 'interleaved', got 'foo'"),
        ({"k": 0}, r"k must be a positive integer, got 0"),
        ({"k": 2.5}, r"k must be a positive integer, got 2\.5"),
        ({"in_block": -1}, r"in_block must be a positive integer, got -1"),
        ({"out_block": 0}, r"out_block must be a positive integer"),
        ({"perm_in": "foo"}, r"unknown permutation 'foo'"),
        (
            {"perm_in": torch.tensor([0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13])},
            r"rearrangement of arange\(15\)",
        ),
        ({"perm_in": torch.arange(14)}, r"arange\(15\).*shape \(14,\)"),
        ({"perm_out": torch.arange(35).reshape(5, 7)}, r"arange\(35\).*shape \(5, 7\)"),
        ({"perm_out": torch.arange(1, 36)}, r"rearrangement of arange\(35\)"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    args = {"in_block": 3, "out_block": 7, "k": 5, **kwargs}
    with pytest.raises(ValueError, match=match):
        PermutedKronLinear(args.pop("in_block"), args.pop("out_block"), args.pop("k"), **args)


@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("perms", [(None, None), ("random", "random")])
def test_forward_rejects_wrong_input_length(blocks, perms):
    layer = make(3, 7, 5, blocks, perms)
    with pytest.raises(ValueError, match=r"length 14"):
        layer(torch.zeros(2, 14, dtype=F64))


# --------------------------------------------------------------------------------------------------------------
# MixingMlp (models.blocks)
# --------------------------------------------------------------------------------------------------------------
MLP_SHAPES = [(3, 5), (4, 6)]
HIDDEN = [None, 7, 2]


def make_mlp(axis, S, C, hidden, permutation, seed=0, act_layer=nn.GELU):
    torch.manual_seed(seed + 123)
    return MixingMlp(axis, S, C, hidden, act_layer=act_layer, permutation=permutation, seed=seed, dtype=F64)


def mlp_vec_forward(mlp: MixingMlp, x: torch.Tensor) -> torch.Tensor:
    """Through the layers' own vec-space forward: fc_last(act(fc1(x)))."""
    h = mlp.fc1(x)
    if mlp.fc2 is not None:
        h = mlp.fc2(mlp.act(h))
    return h


def mlp_dense_forward(mlp: MixingMlp, x: torch.Tensor) -> torch.Tensor:
    """Through the dense effective matrices."""
    h = x
    for i, layer in enumerate(mlp.layers):
        if i > 0:
            h = mlp.act(h)
        h = h @ layer.effective_weight(F64).T + layer.effective_bias(F64)
    return h


def mlp_matrix_oracle(mlp: MixingMlp, X: torch.Tensor) -> torch.Tensor:
    """From weights and permutation buffers only: loops for vec/unvec and permutations, matrix-form mixing."""
    _, S, C = X.shape
    J1 = perm_matrix_loop(mlp.layers[0].perm_in, S * C)
    J2 = perm_matrix_loop(mlp.layers[-1].perm_out, S * C)
    Z = unvec_loop(vec_loop(X) @ J1.T, S, C)  # J_1 vec X as an (S, C) matrix
    for i, layer in enumerate(mlp.layers):
        if i > 0:
            Z = mlp.act(Z)
        W, b = layer.weight.detach(), layer.bias.detach()
        if mlp.axis == "token":  # W (S', S) mixes the rows: W Z + b 1^T
            Z = torch.einsum("ts,bsc->btc", W, Z) + b[:, None]
        else:  # W (C', C) mixes the columns: Z W^T + 1 b^T
            Z = torch.einsum("bsc,dc->bsd", Z, W) + b
    return unvec_loop(vec_loop(Z) @ J2.T, S, C)


@pytest.mark.parametrize("S,C", MLP_SHAPES)
@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("permutation", ["identity", "random"])
def test_mixing_mlp_equals_vec_space_and_dense_forms(S, C, axis, hidden, permutation):
    mlp = make_mlp(axis, S, C, hidden, permutation, seed=3)
    X = randn(2, S, C, seed=12)
    Y = mlp(X)
    assert Y.shape == (2, S, C)
    via_layers = unvec(mlp_vec_forward(mlp, vec(X)), S, C)
    torch.testing.assert_close(Y, via_layers, **TOL)
    via_dense = unvec_loop(mlp_dense_forward(mlp, vec_loop(X)), S, C)
    torch.testing.assert_close(Y, via_dense, **TOL)
    torch.testing.assert_close(Y, mlp_matrix_oracle(mlp, X), **TOL)


@pytest.mark.parametrize("S,C", MLP_SHAPES)
@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("hidden", HIDDEN)
def test_mixing_mlp_structure(S, C, axis, hidden):
    plain = make_mlp(axis, S, C, hidden, "identity")
    rp = make_mlp(axis, S, C, hidden, "random", seed=1)
    n, k = (S, C) if axis == "token" else (C, S)
    h = n if hidden is None else hidden
    assert len(plain.layers) == (1 if hidden is None else 2)
    assert (plain.fc1.in_block, plain.fc1.out_block, plain.fc1.k) == (n, h, k)
    assert plain.fc1.blocks == ("contiguous" if axis == "token" else "interleaved")
    # docs/theory.md §3.5: density 1/C for token mixing, 1/S for channel mixing; γ m hidden units
    assert plain.fc1.density == pytest.approx(1 / C if axis == "token" else 1 / S, rel=1e-15)
    assert plain.fc1.out_features == h * k and plain.layers[-1].out_features == S * C
    # docs/theory.md §4.3: J_1 on the input of the first map, J_2 on the output of the last; none in between
    assert all(layer.perm_in is None and layer.perm_out is None for layer in plain.layers)
    assert rp.layers[0].perm_in is not None and rp.layers[-1].perm_out is not None
    if hidden is not None:
        assert rp.fc1.perm_out is None and rp.fc2.perm_in is None
        assert not torch.equal(rp.fc1.perm_in, rp.fc2.perm_out)
    else:
        assert not torch.equal(rp.fc1.perm_in, rp.fc1.perm_out)
    # same parameter count; gather indices are not saved
    assert sum(t.numel() for t in rp.parameters()) == sum(t.numel() for t in plain.parameters())
    assert not any(key.startswith("idx_") for key in rp.state_dict())


@pytest.mark.parametrize("S,C", MLP_SHAPES)
@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("hidden", HIDDEN)
def test_mixing_mlp_gradients_match_vec_space(S, C, axis, hidden):
    mlp = make_mlp(axis, S, C, hidden, "random", seed=5)
    X = randn(3, S, C, seed=13)
    G = randn(3, S, C, seed=14)
    (mlp(X) * G).sum().backward()
    fast = {name: p.grad.clone() for name, p in mlp.named_parameters()}
    mlp.zero_grad(set_to_none=True)
    (unvec(mlp_vec_forward(mlp, vec(X)), S, C) * G).sum().backward()
    for name, p in mlp.named_parameters():
        assert fast[name].abs().max() > 0
        torch.testing.assert_close(fast[name], p.grad, **TOL)


@pytest.mark.parametrize("S,C", MLP_SHAPES)
@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("hidden", HIDDEN)
def test_mixing_mlp_load_state_dict_takes_the_permutations(S, C, axis, hidden):
    a = make_mlp(axis, S, C, hidden, "random", seed=0)
    b = make_mlp(axis, S, C, hidden, "random", seed=17)
    X = randn(2, S, C, seed=15)
    assert not torch.equal(b.fc1.perm_in, a.fc1.perm_in)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.fc1.perm_in, a.fc1.perm_in) and torch.equal(b.layers[-1].perm_out, a.layers[-1].perm_out)
    assert torch.equal(b(X), a(X))
    torch.testing.assert_close(b(X), mlp_matrix_oracle(a, X), **TOL)


def test_mixing_mlp_buffer_copy_takes_effect_at_once():
    a = make_mlp("channel", 3, 5, 7, "random", seed=0)
    b = make_mlp("channel", 3, 5, 7, "random", seed=9)
    X = randn(2, 3, 5, seed=16)
    with torch.no_grad():
        for name, t in a.state_dict().items():
            b.get_parameter(name).copy_(t) if name.endswith(("weight", "bias")) else b.get_buffer(name).copy_(t)
    assert torch.equal(b(X), a(X))  # no derived gather tables to refresh


def test_mixer_block_load_state_dict_refreshes_nested_mixing_mlps():
    kw = {"act_layer": nn.GELU, "norm_layer": nn.LayerNorm, "permutation": "random", "dtype": F64}
    a = MixerBlock(3, 5, 7, 2, seeds=(0, 1), **kw)
    b = MixerBlock(3, 5, 7, 2, seeds=(20, 21), **kw)
    X = randn(2, 3, 5, seed=17)
    assert not torch.allclose(b(X), a(X))
    b.load_state_dict(a.state_dict())
    assert torch.equal(b(X), a(X))


def test_permutation_tensor_validation_and_no_aliasing():
    import pickle

    from widesparse.layers import PermutedKronLinear
    from widesparse.models.blocks import MixingMlp

    with pytest.raises(ValueError, match="integer index tensor"):
        PermutedKronLinear(2, 2, 2, perm_in=torch.tensor([0.2, 1.7, 2.1, 3.0]))
    with pytest.raises(ValueError, match="positive integer"):
        PermutedKronLinear(2, 2, None)
    with pytest.raises(ValueError, match="positive integer"):
        PermutedKronLinear(2, 2, "a")
    perm = torch.tensor([1, 0, 3, 2])
    layer = PermutedKronLinear(2, 2, 2, perm_in=perm)
    perm[0] = 3
    assert layer.perm_in.tolist() == [1, 0, 3, 2]
    mlp = MixingMlp("channel", 3, 4, 5, permutation="random", seed=2)
    clone = pickle.loads(pickle.dumps(mlp))
    x = torch.randn(2, 3, 4)
    assert torch.equal(clone(x), mlp(x))
