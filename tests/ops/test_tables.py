"""The permutations' gather tables (widesparse.ops.tables): derived from the buffer, cached on its identity and
version, never stale."""

from __future__ import annotations

import gc

import torch

from widesparse.linalg import apply_perm, unvec, vec
from widesparse.ops import tables
from widesparse.ops.tables import compute_tables, perm_tables

S, C = 3, 5


def _perm(seed: int) -> torch.Tensor:
    return torch.randperm(S * C, generator=torch.Generator().manual_seed(seed))


def _same(a: tables.PermTables, b: tables.PermTables) -> bool:
    return all(torch.equal(x, y) for pa, pb in zip(a, b, strict=True) for x, y in zip(pa, pb, strict=True))


def test_the_tables_are_the_permutation_on_each_storage_layout() -> None:
    p = _perm(0)
    X = torch.randn(2, S, C, dtype=torch.float64)
    want = unvec(apply_perm(vec(X), p), S, C)  # (B, S, C)
    t = perm_tables(p, S, C)
    assert torch.equal(X.reshape(2, -1)[:, t.rm[0]].view(2, S, C), want)
    assert torch.equal(X.reshape(2, -1)[:, t.to_cm[0]].view(2, C, S), want.transpose(1, 2))
    assert torch.equal(X.transpose(1, 2).reshape(2, -1)[:, t.from_cm[0]].view(2, S, C), want)
    for idx, inv in t:
        assert torch.equal(idx[inv], torch.arange(S * C))


def test_cached_until_the_buffer_changes_in_place_or_by_copy() -> None:
    p = _perm(1)
    first = perm_tables(p, S, C)
    assert perm_tables(p, S, C) is first
    p[:2] = p[[1, 0]].clone()
    edited = perm_tables(p, S, C)
    assert edited is not first and _same(edited, compute_tables(p, S, C))
    p.copy_(_perm(2))
    assert _same(perm_tables(p, S, C), compute_tables(_perm(2), S, C))
    assert _same(perm_tables(p, 5, 3), compute_tables(p, 5, 3))  # another grid: its own entry


def test_entries_die_with_their_tensor_and_a_new_tensor_is_never_served_old_tables() -> None:
    tables.clear_cache()
    for seed in range(20):  # freed and reallocated buffers (often at the same address, version 0)
        p = _perm(seed)
        assert _same(perm_tables(p, S, C), compute_tables(p, S, C))
        del p
        gc.collect()
    assert len(tables._CACHE) == 0


def test_inference_tensors_are_computed_each_time() -> None:
    with torch.inference_mode():
        p = _perm(3)
    assert p.is_inference()
    assert _same(perm_tables(p, S, C), compute_tables(p, S, C))
    assert id(p) not in tables._CACHE


def test_tables_built_under_inference_mode_serve_a_later_training_forward() -> None:
    from widesparse.models import create_model

    m = create_model("rp_mixer", image_size=8, patch_size=2, in_chans=3, dim=6, depth=1)
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        m(x)
    m(x).sum().backward()
    assert m.blocks[0].mlp_tokens.fc1.weight.grad is not None
