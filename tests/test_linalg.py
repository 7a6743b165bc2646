"""Tests of widesparse.linalg: vec/unvec, commutation permutations and the identities (4)-(7), (13) of docs/theory.md.

Every oracle is built independently of the code under test: vec by explicit index loops, permutation and
commutation matrices entry by entry, Kronecker products with ``torch.kron``. Everything runs in float64.
"""

from __future__ import annotations

import itertools
import re

import pytest
import torch

from widesparse.linalg import (
    apply_identity_kron,
    apply_kron_identity,
    apply_perm,
    apply_permuted_kron,
    commutation_matrix_dense,
    commutation_perm,
    compose_perms,
    invert_perm,
    is_identity_perm,
    kron_dense,
    perm_matrix_dense,
    permuted_kron_dense,
    random_perm,
    unvec,
    vec,
    vec_positions,
    vec_to_rowmajor,
)

F64 = torch.float64
TOL = {"rtol": 0.0, "atol": 1e-12}
SHAPES = [(3, 5), (4, 6), (5, 3), (4, 4)]  # (S, C); rectangular both ways and one square


pytestmark = pytest.mark.usefixtures("single_thread")


# --------------------------------------------------------------------------------------------------------------
# independent oracles
# --------------------------------------------------------------------------------------------------------------
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=F64)


def vec_loop(x: torch.Tensor) -> torch.Tensor:
    """Column-major vec by explicit loops: ``X[..., s, c] -> position s + c*S``."""
    *lead, S, C = x.shape
    flat = x.reshape(-1, S, C)
    out = torch.empty(flat.shape[0], S * C, dtype=x.dtype)
    for b in range(flat.shape[0]):
        for s in range(S):
            for c in range(C):
                out[b, s + c * S] = flat[b, s, c]
    return out.reshape(*lead, S * C)


def unvec_loop(v: torch.Tensor, S: int, C: int) -> torch.Tensor:
    *lead, n = v.shape
    assert n == S * C
    flat = v.reshape(-1, n)
    out = torch.empty(flat.shape[0], S, C, dtype=v.dtype)
    for b in range(flat.shape[0]):
        for s in range(S):
            for c in range(C):
                out[b, s, c] = flat[b, s + c * S]
    return out.reshape(*lead, S, C)


def perm_matrix_loop(perm: torch.Tensor) -> torch.Tensor:
    """``J`` with ``(J x)[i] = x[perm[i]]``, entry by entry."""
    n = perm.numel()
    J = torch.zeros(n, n, dtype=F64)
    for i in range(n):
        J[i, int(perm[i])] = 1.0
    return J


def commutation_loop(m: int, n: int) -> torch.Tensor:
    """``K_{m,n}`` from its definition ``K vec(A) = vec(A^T)`` for ``A`` (m x n): ``K[j + i n, i + j m] = 1``."""
    K = torch.zeros(m * n, m * n, dtype=F64)
    for i in range(m):
        for j in range(n):
            K[j + i * n, i + j * m] = 1.0
    return K


def kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.kron`` on contiguous copies: torch 2.13's kron raises on some non-contiguous inputs (e.g. ``V.T``)."""
    return torch.kron(a.contiguous(), b.contiguous())


def kron_loop(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a ⊗ b`` block by block: block ``(i, j)`` is ``a[i, j] * b``."""
    (p, q), (r, s) = a.shape, b.shape
    out = torch.zeros(p * r, q * s, dtype=a.dtype)
    for i in range(p):
        for j in range(q):
            out[i * r : (i + 1) * r, j * s : (j + 1) * s] = a[i, j] * b
    return out


def eye(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=F64)


def ones(n: int) -> torch.Tensor:
    return torch.ones(n, dtype=F64)


def matvec(M: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``M x`` on the last dimension of a batch."""
    return x @ M.T


def test_kron_oracle_against_block_loop():
    for (p, q), (r, s) in [((3, 5), (2, 7)), ((4, 1), (3, 3)), ((2, 2), (1, 4))]:
        a, b = randn(p, q, seed=p * q), randn(r, s, seed=r + s)
        torch.testing.assert_close(kron(a, b), kron_loop(a, b), **TOL)
        torch.testing.assert_close(kron(a.T, b), kron_loop(a.T, b), **TOL)
        torch.testing.assert_close(kron_dense(a, b), kron_loop(a, b), **TOL)


def test_kron_dense_accepts_transposed_factor():
    V = randn(5, 2, seed=50)
    torch.testing.assert_close(kron_dense(V.T, eye(3)), kron_loop(V.T, eye(3)), **TOL)


def test_channel_mixing_effective_with_a_fresh_factor():
    from widesparse.effective import channel_mixing_effective

    V = randn(4, 6, seed=51)  # (C, C'), contiguous: V.T is not
    torch.testing.assert_close(channel_mixing_effective(V, 3), kron_loop(V.T, eye(3)), **TOL)


# --------------------------------------------------------------------------------------------------------------
# vec / unvec
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("S,C", SHAPES)
def test_vec_is_column_major_by_explicit_loop(S, C):
    X = randn(S, C, seed=1)
    v = vec(X)
    assert v.shape == (S * C,)
    for s in range(S):
        for c in range(C):
            assert v[s + c * S] == X[s, c]
    assert torch.equal(v, vec_loop(X))


def test_vec_of_arange_matrix_is_the_expected_sequence():
    # X[s, c] = 10 s + c with S=3, C=2 -> columns stacked: [0, 10, 20, 1, 11, 21]
    X = torch.tensor([[0, 1], [10, 11], [20, 21]])
    assert vec(X).tolist() == [0, 10, 20, 1, 11, 21]
    assert torch.equal(unvec(torch.tensor([0, 10, 20, 1, 11, 21]), 3, 2), X)


@pytest.mark.parametrize("S,C", SHAPES)
@pytest.mark.parametrize("lead", [(), (2,), (2, 3)])
def test_vec_unvec_batched(S, C, lead):
    X = randn(*lead, S, C, seed=2)
    v = vec(X)
    assert v.shape == (*lead, S * C)
    assert torch.equal(v, vec_loop(X))
    back = unvec(v, S, C)
    assert back.shape == X.shape
    assert torch.equal(back, X)
    # unvec against its own loop oracle on an arbitrary vector
    y = randn(*lead, S * C, seed=3)
    assert torch.equal(unvec(y, S, C), unvec_loop(y, S, C))
    assert torch.equal(vec(unvec(y, S, C)), y)


def test_vec_distinguishes_transpose():
    # guards against a row-major vec: for S != C, vec(X) must differ from X.reshape(-1)
    X = randn(3, 5, seed=4)
    assert not torch.equal(vec(X), X.reshape(-1))
    assert torch.equal(vec(X), X.T.reshape(-1))


def test_unvec_shape_error_names_the_numbers():
    with pytest.raises(ValueError) as err:
        unvec(torch.zeros(2, 14), 3, 5)
    msg = str(err.value)
    for number in ("14", "3", "5", "15"):
        assert re.search(rf"\b{number}\b", msg), (number, msg)


# --------------------------------------------------------------------------------------------------------------
# commutation permutations and permutation helpers
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m,n", [(3, 5), (5, 3), (4, 6), (1, 4), (4, 1), (3, 3)])
def test_commutation_perm_maps_vec_a_to_vec_a_transpose(m, n):
    A = randn(2, m, n, seed=5)
    perm = commutation_perm(m, n)
    assert sorted(perm.tolist()) == list(range(m * n))
    assert torch.equal(apply_perm(vec_loop(A), perm), vec_loop(A.transpose(-1, -2)))
    assert torch.equal(vec(A)[..., perm], vec(A.transpose(-1, -2)))


@pytest.mark.parametrize("m,n", [(3, 5), (5, 3), (4, 6), (2, 2)])
def test_commutation_matrix_dense_index_form(m, n):
    K = commutation_matrix_dense(m, n)
    assert K.dtype == F64
    assert K.shape == (m * n, m * n)
    assert torch.equal(K, commutation_loop(m, n))
    assert torch.equal(K, torch.eye(m * n, dtype=F64)[commutation_perm(m, n)])
    assert torch.equal(K, perm_matrix_loop(commutation_perm(m, n)))
    # defining property as a matrix product
    A = randn(m, n, seed=6)
    torch.testing.assert_close(K @ vec_loop(A), vec_loop(A.T), **TOL)


@pytest.mark.parametrize("m,n", [(3, 5), (4, 6), (2, 7)])
def test_commutation_inverse_is_transpose_is_k_nm(m, n):
    K_mn = commutation_loop(m, n)
    K_nm = commutation_loop(n, m)
    assert torch.equal(commutation_matrix_dense(m, n).T, commutation_matrix_dense(n, m))
    assert torch.equal(K_mn.T, K_nm)
    assert torch.equal(K_mn @ K_nm, eye(m * n))
    # index form: K_{n,m} undoes K_{m,n}; invert_perm of one is the other
    p, q = commutation_perm(m, n), commutation_perm(n, m)
    assert torch.equal(invert_perm(p), q)
    assert torch.equal(p[q], torch.arange(m * n))
    if m != n:
        assert not torch.equal(p, q)


def test_perm_matrix_dense_matches_loop_and_gather():
    perm = random_perm(11, seed=3)
    J = perm_matrix_dense(perm)
    assert J.dtype == F64
    assert torch.equal(J, perm_matrix_loop(perm))
    x = randn(4, 11, seed=7)
    assert torch.equal(matvec(J, x), apply_perm(x, perm))
    assert torch.equal(perm_matrix_dense(perm, torch.float32), J.float())


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_invert_perm(seed):
    perm = random_perm(13, seed)
    inv = invert_perm(perm)
    x = randn(3, 13, seed=8)
    assert torch.equal(apply_perm(apply_perm(x, perm), inv), x)
    assert torch.equal(apply_perm(apply_perm(x, inv), perm), x)
    assert torch.equal(inv, torch.argsort(perm))
    assert torch.equal(perm_matrix_loop(inv), perm_matrix_loop(perm).T)


def test_compose_perms_semantics():
    n = 10
    a, b, c = random_perm(n, 1), random_perm(n, 2), random_perm(n, 3)
    x = randn(2, n, seed=9)
    ab = compose_perms(a, b)
    assert torch.equal(apply_perm(x, ab), apply_perm(apply_perm(x, b), a))
    # as matrices: J_{ab} = J_a J_b
    assert torch.equal(perm_matrix_loop(ab), perm_matrix_loop(a) @ perm_matrix_loop(b))
    # order matters for these perms (guards against a symmetric implementation)
    assert not torch.equal(compose_perms(a, b), compose_perms(b, a))
    abc = compose_perms(a, b, c)
    assert torch.equal(apply_perm(x, abc), apply_perm(apply_perm(apply_perm(x, c), b), a))
    assert torch.equal(perm_matrix_loop(abc), perm_matrix_loop(a) @ perm_matrix_loop(b) @ perm_matrix_loop(c))
    # None is the identity
    assert compose_perms() is None
    assert compose_perms(None, None) is None
    assert torch.equal(compose_perms(None, a), a)
    assert torch.equal(compose_perms(a, None), a)
    assert torch.equal(compose_perms(a, None, b), ab)


def test_apply_perm_none_and_errors():
    x = randn(2, 6, seed=10)
    assert apply_perm(x, None) is x
    with pytest.raises(ValueError, match=r"length 5.*length 6"):
        apply_perm(x, torch.arange(5))


def test_random_perm_seeded_and_a_permutation():
    p1, p2, p3 = random_perm(50, 123), random_perm(50, 123), random_perm(50, 124)
    assert p1.dtype == torch.int64
    assert torch.equal(p1, p2)
    assert not torch.equal(p1, p3)
    assert sorted(p1.tolist()) == list(range(50))
    assert not is_identity_perm(p1)


def test_random_perm_independent_of_global_rng():
    torch.manual_seed(0)
    a = random_perm(20, 5)
    torch.manual_seed(999)
    torch.rand(17)  # advance the global generator
    b = random_perm(20, 5)
    assert torch.equal(a, b)


def test_is_identity_perm():
    assert is_identity_perm(None)
    assert is_identity_perm(torch.arange(7))
    assert is_identity_perm(torch.arange(1))
    assert not is_identity_perm(torch.tensor([1, 0, 2]))
    assert not is_identity_perm(commutation_perm(3, 5))
    # K_{1,n} and K_{n,1} are identities; K_{2,2} is not
    assert is_identity_perm(commutation_perm(1, 6))
    assert is_identity_perm(commutation_perm(6, 1))
    assert not is_identity_perm(commutation_perm(2, 2))


def test_commutation_perm_rejects_nonpositive_sizes():
    with pytest.raises(ValueError, match=r"m=0, n=3"):
        commutation_perm(0, 3)


# --------------------------------------------------------------------------------------------------------------
# docs/theory.md identities (4)-(7), biases, (13), phi/J commutation
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("S,C,S2,C2", [(3, 5, 7, 2), (4, 6, 2, 7), (5, 3, 4, 4)])
def test_identity_4_vec_wxv(S, C, S2, C2):
    W, X, V = randn(S2, S, seed=11), randn(S, C, seed=12), randn(C, C2, seed=13)
    lhs = vec_loop(W @ X @ V)
    rhs = kron(V.T, W) @ vec_loop(X)
    torch.testing.assert_close(lhs, rhs, **TOL)
    # (V ⊗ W) is not the answer for a non-square V (shape) / generic V (values)
    if C == C2:
        assert not torch.allclose(kron(V, W) @ vec_loop(X), lhs)


@pytest.mark.parametrize("S,C,S2", [(3, 5, 7), (4, 6, 2)])
def test_identity_5_token_mixing(S, C, S2):
    W, X = randn(S2, S, seed=14), randn(2, S, C, seed=15)
    lhs = vec_loop(W @ X)
    dense = kron(eye(C), W)
    torch.testing.assert_close(lhs, matvec(dense, vec_loop(X)), **TOL)
    torch.testing.assert_close(lhs, apply_kron_identity(W, vec(X), C), **TOL)
    # C identical diagonal blocks
    for c in range(C):
        assert torch.equal(dense[c * S2 : (c + 1) * S2, c * S : (c + 1) * S], W)
    assert int((dense != 0).sum()) == C * S2 * S


@pytest.mark.parametrize("S,C,C2", [(3, 5, 7), (4, 6, 2), (5, 3, 3)])
def test_identity_6_channel_mixing(S, C, C2):
    X, V = randn(2, S, C, seed=16), randn(C, C2, seed=17)
    lhs = vec_loop(X @ V)
    first = kron(V.T, eye(S))
    second = commutation_loop(C2, S) @ kron(eye(S), V.T) @ commutation_loop(S, C)
    torch.testing.assert_close(first, second, **TOL)
    torch.testing.assert_close(lhs, matvec(first, vec_loop(X)), **TOL)
    torch.testing.assert_close(lhs, matvec(second, vec_loop(X)), **TOL)
    # the index-form implementation: K_{C',S} (I_S ⊗ V^T) K_{S,C} by gather, matmul, gather
    fast = apply_permuted_kron(V.T, vec(X), S, perm_in=commutation_perm(S, C), perm_out=commutation_perm(C2, S))
    torch.testing.assert_close(fast, lhs, **TOL)
    torch.testing.assert_close(apply_identity_kron(V.T, vec(X), S), lhs, **TOL)


@pytest.mark.parametrize("S,C", [(3, 5), (4, 6), (5, 3)])
def test_identity_7_square_channel(S, C):
    V = randn(C, C, seed=18)
    Jc = commutation_loop(S, C)
    assert torch.equal(Jc, commutation_matrix_dense(S, C))
    torch.testing.assert_close(Jc.T @ kron(eye(S), V.T) @ Jc, kron(V.T, eye(S)), **TOL)


@pytest.mark.parametrize("S,C", [(3, 5), (4, 6), (4, 4)])
def test_identity_7_paper_slip(S, C):
    """docs/theory.md §3.3 known typo: J_c^T (I_S ⊗ V) J_c is V ⊗ I_S, not V^T ⊗ I_S."""
    V = randn(C, C, seed=19)
    assert not torch.allclose(V, V.T)
    Jc = commutation_loop(S, C)
    slip = Jc.T @ kron(eye(S), V) @ Jc
    torch.testing.assert_close(slip, kron(V, eye(S)), **TOL)
    assert (slip - kron(V.T, eye(S))).abs().max() > 1e-3
    # for a symmetric V the slip is harmless
    Vs = V + V.T
    torch.testing.assert_close(Jc.T @ kron(eye(S), Vs) @ Jc, kron(Vs.T, eye(S)), **TOL)


@pytest.mark.parametrize("S,C", [(3, 5), (4, 6)])
def test_bias_identities(S, C):
    b, c = randn(S, seed=20), randn(C, seed=21)
    torch.testing.assert_close(vec_loop(torch.outer(b, ones(C))), kron(ones(C), b), **TOL)
    torch.testing.assert_close(vec_loop(torch.outer(ones(S), c)), kron(c, ones(S)), **TOL)
    # and they are different from the swapped forms
    assert not torch.allclose(vec_loop(torch.outer(b, ones(C))), kron(b, ones(C)))


@pytest.mark.parametrize("S,C", [(4, 4), (3, 5), (4, 6)])
def test_monarch_13(S, C):
    W, V, X = randn(S, S, seed=22), randn(C, C, seed=23), randn(S, C, seed=24)
    Jc = commutation_loop(S, C)
    P, L, R = Jc.T, kron(eye(S), V.T), kron(eye(C), W)
    M = kron(V.T, W)
    torch.testing.assert_close(P @ L @ Jc @ R, M, **TOL)
    torch.testing.assert_close(P @ L @ P.T @ R, M, **TOL)
    torch.testing.assert_close(P, commutation_loop(C, S), **TOL)  # P = K_{C,S}
    torch.testing.assert_close(M @ vec_loop(X), vec_loop(W @ X @ V), **TOL)
    # the fast path: channel step after token step, by gathers and batched matmuls
    x = vec(X)
    y = apply_permuted_kron(V.T, apply_kron_identity(W, x, C), S, commutation_perm(S, C), commutation_perm(C, S))
    torch.testing.assert_close(y, vec_loop(W @ X @ V), **TOL)
    # tied blocks: L has S copies of V^T, R has C copies of W
    for s in range(S):
        assert torch.equal(L[s * C : (s + 1) * C, s * C : (s + 1) * C], V.T)


@pytest.mark.parametrize("act", [torch.nn.functional.gelu, torch.relu, torch.tanh, torch.nn.functional.silu])
def test_activation_commutes_with_permutation(act):
    n = 15
    perm = random_perm(n, 4)
    J = perm_matrix_loop(perm)
    x = randn(3, n, seed=25)
    torch.testing.assert_close(act(matvec(J, x)), matvec(J, act(x)), **TOL)
    assert torch.equal(act(apply_perm(x, perm)), apply_perm(act(x), perm))
    # and a commutation permutation (J_c) too
    Jc = commutation_loop(3, 5)
    torch.testing.assert_close(act(matvec(Jc, x)), matvec(Jc, act(x)), **TOL)


# --------------------------------------------------------------------------------------------------------------
# Kronecker products applied without building them
# --------------------------------------------------------------------------------------------------------------
KRON_CASES = [(7, 3, 5), (2, 4, 6), (3, 3, 4), (1, 5, 3), (5, 1, 2)]  # (p, q, k): A is p x q


@pytest.mark.parametrize("p,q,k", KRON_CASES)
@pytest.mark.parametrize("lead", [(), (3,), (2, 2)])
def test_apply_kron_identity_matches_dense(p, q, k, lead):
    A, x = randn(p, q, seed=26), randn(*lead, k * q, seed=27)
    y = apply_kron_identity(A, x, k)
    assert y.shape == (*lead, k * p)
    torch.testing.assert_close(y, matvec(kron(eye(k), A), x), **TOL)


@pytest.mark.parametrize("p,q,k", KRON_CASES)
@pytest.mark.parametrize("lead", [(), (3,), (2, 2)])
def test_apply_identity_kron_matches_dense(p, q, k, lead):
    A, x = randn(p, q, seed=28), randn(*lead, q * k, seed=29)
    y = apply_identity_kron(A, x, k)
    assert y.shape == (*lead, p * k)
    torch.testing.assert_close(y, matvec(kron(A, eye(k)), x), **TOL)


def test_kron_helpers_distinguish_orders():
    A, x = randn(3, 3, seed=30), randn(12, seed=31)
    assert not torch.allclose(apply_kron_identity(A, x, 4), apply_identity_kron(A, x, 4))


@pytest.mark.parametrize("p,q,k", KRON_CASES)
@pytest.mark.parametrize("perms", ["none", "in", "out", "both"])
def test_apply_permuted_kron_and_dense(p, q, k, perms):
    A, x = randn(p, q, seed=32), randn(2, 3, k * q, seed=33)
    pin = random_perm(k * q, 41) if perms in ("in", "both") else None
    pout = random_perm(k * p, 42) if perms in ("out", "both") else None
    J1 = eye(k * q) if pin is None else perm_matrix_loop(pin)
    J2 = eye(k * p) if pout is None else perm_matrix_loop(pout)
    oracle = J2 @ kron(eye(k), A) @ J1
    dense = permuted_kron_dense(A, k, pin, pout)
    assert dense.shape == (k * p, k * q)
    torch.testing.assert_close(dense, oracle, **TOL)
    torch.testing.assert_close(apply_permuted_kron(A, x, k, pin, pout), matvec(oracle, x), **TOL)


def test_permuted_kron_dense_uses_perm_in_on_the_input_side():
    # with a non-symmetric permutation, J_1 vs J_1^T must matter
    A = randn(2, 2, seed=34)
    pin = torch.tensor([1, 2, 3, 0, 5, 4])  # a 4-cycle: J != J^T
    assert not torch.equal(perm_matrix_loop(pin), perm_matrix_loop(pin).T)
    oracle = kron(eye(3), A) @ perm_matrix_loop(pin)
    torch.testing.assert_close(permuted_kron_dense(A, 3, perm_in=pin), oracle, **TOL)
    wrong = kron(eye(3), A) @ perm_matrix_loop(pin).T
    assert not torch.allclose(permuted_kron_dense(A, 3, perm_in=pin), wrong)


def test_kron_length_errors_are_clear():
    A = randn(7, 3, seed=35)
    with pytest.raises(ValueError, match=r"length 14.*4\*3 = 12"):
        apply_kron_identity(A, torch.zeros(2, 14, dtype=F64), 4)
    with pytest.raises(ValueError, match=r"length 14.*3\*4 = 12"):
        apply_identity_kron(A, torch.zeros(2, 14, dtype=F64), 4)
    with pytest.raises(ValueError, match=r"length 11"):
        apply_permuted_kron(A, torch.zeros(12, dtype=F64), 4, perm_in=torch.arange(11))
    with pytest.raises(ValueError, match=r"length 27"):
        apply_permuted_kron(A, torch.zeros(12, dtype=F64), 4, perm_out=torch.arange(27))


# --------------------------------------------------------------------------------------------------------------
# vec positions <-> row-major storage
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows,cols", SHAPES)
def test_vec_positions_by_loop(rows, cols):
    v = vec_positions(rows, cols)
    for r, c in itertools.product(range(rows), range(cols)):
        assert int(v[r * cols + c]) == r + c * rows
    X = randn(rows, cols, seed=36)
    # the vec position of each row-major entry: vec(X)[v] is the row-major storage
    assert torch.equal(vec(X)[v], X.reshape(-1))


@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_vec_to_rowmajor(rows, cols, seed):
    X = randn(2, 3, rows, cols, seed=37 + seed)
    idx = random_perm(rows * cols, seed)
    rm = vec_to_rowmajor(idx, rows, cols)
    assert torch.equal(vec(X)[..., idx], X.reshape(2, 3, -1)[..., rm])
    assert torch.equal(vec_loop(X)[..., idx], X.reshape(2, 3, -1)[..., rm])
    # identity vec positions map to the inverse of vec_positions
    full = vec_to_rowmajor(torch.arange(rows * cols), rows, cols)
    assert torch.equal(full[vec_positions(rows, cols)], torch.arange(rows * cols))
    for i in range(rows * cols):
        assert int(full[i]) == (i % rows) * cols + i // rows


def test_permute_last_matches_indexing_with_gradients():
    from widesparse.ops.gathers import permute_last

    g = torch.Generator().manual_seed(3)
    perm = torch.randperm(12, generator=g)
    x = torch.randn(4, 12, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, 12, dtype=torch.float64, generator=g)
    y = permute_last(x, perm)
    assert torch.equal(y, x[..., perm])
    (gx,) = torch.autograd.grad((y * w).sum(), x)
    (ref,) = torch.autograd.grad((x[..., perm] * w).sum(), x)
    assert torch.equal(gx, ref)
    assert torch.autograd.gradcheck(lambda t: permute_last(t, perm), (x,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_permute_last_low_precision_moves_bits_exactly(dtype):
    from widesparse.ops.gathers import permute_last

    x = torch.randn(3, 5, 24).to(dtype).requires_grad_()
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(1))
    y = permute_last(x, perm)
    assert y.dtype == dtype and torch.equal(y, x.detach()[..., perm])
    g = torch.randn(3, 5, 24).to(dtype)
    y.backward(g)
    want = torch.empty_like(g)
    want[..., perm] = g
    assert torch.equal(x.grad, want)
