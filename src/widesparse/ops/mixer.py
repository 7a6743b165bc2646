"""The fast executors of the Mixer family's forward: the same values as the math, other memory layouts.

Each runs blocks described by :class:`~widesparse.ops.route.SublayerSpec` (plain tensors and callables built by
the models) on the :class:`~widesparse.ops.route.Route` that :func:`~widesparse.ops.route.choose_route` picked:

* batch-major ``(B, S, C)`` (:func:`sublayer_bsc`): token mixing ``W X`` as a 1x1 convolution over ``(B, S, C)``
  (no transposed copies), or, where ``route.token_last``, as ``linear_last`` over channel-major ``(B, C, S)``
  storage that ``J_1``/``J_2`` gather straight into and out of; the compiled LayerNorm + ``J_1`` (bf16) and
  ``J_2`` + residual passes of :mod:`widesparse.ops.cpu_kernels` where the route allows and they apply.
* token-major ``(S, B, C)`` (:func:`sublayer_sbc`): token mixing is one ``(D_S, S) @ (S, B*C)`` product, channel
  mixing one ``(S*B, C) @ (C, D_C)`` product; RP permutations gather on the batch-major ``(B, S*C)`` view
  (``J_1`` casts, transposes and gathers in one pass) and channel mixing runs between ``J_1`` and ``J_2`` there.
* the S-Mixer chain (:func:`run_chain`): ``J_1' act(J_2 z) = act(J_1' J_2 z)`` (docs/theory.md §3.3), one gather
  between two steps instead of two (2L + 1 gathers for L blocks instead of 4L).
* gradient checkpointing: each block recomputed in the backward pass.

The permutations' gather tables come from :func:`widesparse.ops.tables.perm_tables` (derived from the buffers,
cached on their version). Mixing MLPs and blocks described as modules (they have hooks) are called.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from widesparse.ops.cpu_kernels import permute_add, permuted_layer_norm
from widesparse.ops.gathers import compose_gathers, gather_sbc_to_bsc, permute_bsc, permute_last, permute_sbc
from widesparse.ops.matmul import autocast_dtype, autocast_input, linear_first, linear_last
from widesparse.ops.route import BlockSpec, MlpSpec, Route, SublayerSpec
from widesparse.ops.tables import perm_tables

__all__ = ["run_blocks", "run_chain", "sublayer_bsc", "sublayer_sbc", "mlp_bsc", "mlp_sbc"]

Block = Callable[[Tensor], Tensor]


def run_blocks(route: Route, blocks: Sequence[Block], specs: Sequence[BlockSpec] | None, x: Tensor) -> Tensor:
    """The residual stream ``x`` through ``blocks`` on ``route``: ``(B, S, C)``, or ``(S, B, C)`` on ``"sbc"``.

    ``blocks`` are the block modules (called on the plain route and where ``specs[i]`` is ``None``); on the plain
    route without checkpointing ``blocks`` itself is called when callable (an ``nn.Sequential``)."""
    if route.layout == "plain":
        if not route.checkpoint and callable(blocks):
            return blocks(x)
        for blk in blocks:
            x = checkpoint(blk, x, use_reentrant=False) if route.checkpoint else blk(x)
        return x
    if specs is None:
        raise ValueError(f"the {route.layout!r} route needs the blocks' specs (SublayerSpec pairs)")
    if route.chain:
        return run_chain(specs, x, route)
    sbc = route.layout == "sbc"
    for blk, spec in zip(blocks, specs, strict=True):
        if spec is None:
            fn = partial(_block_as_sbc, blk) if sbc else blk
        else:
            fn = partial(_block_step, spec, route, sublayer_sbc if sbc else sublayer_bsc)
        x = checkpoint(fn, x, use_reentrant=False) if route.checkpoint else fn(x)
    return x


def _block_step(spec: tuple[SublayerSpec, SublayerSpec], route: Route, step: Callable, x: Tensor) -> Tensor:
    return step(spec[1], step(spec[0], x, route), route)


def _block_as_sbc(blk: Block, x: Tensor) -> Tensor:
    return blk(x.transpose(0, 1)).transpose(0, 1).contiguous()


# ------------------------------------------------------------------------------------------ batch-major
def sublayer_bsc(s: SublayerSpec, x: Tensor, route: Route) -> Tensor:
    """``x + drop_path(outer_act(mlp(norm(x))))`` on ``(B, S, C)`` (docs/theory.md (1)-(3))."""
    m = s.mlp
    residual = x if s.outer_act is None and s.residual and s.drop_path is None else None
    if m.module is not None:
        y = m.module(x if s.norm is None else s.norm(x))
        if residual is not None:
            return residual + y
    else:
        y = _mlp_from_norm(s, x, route, residual)
        if residual is not None:  # added inside (with J_2 where it can)
            return y
    if s.outer_act is not None:
        y = s.outer_act(y)
    if not s.residual:
        return y
    return x + (y if s.drop_path is None else s.drop_path(y, 0))


def _mlp_from_norm(s: SublayerSpec, x: Tensor, route: Route, residual: Tensor | None) -> Tensor:
    """``mlp(norm(x)) (+ residual)``; LayerNorm and ``J_1`` in one compiled pass where the route allows."""
    m = s.mlp
    if m.perm_in is not None and route.fuse_norm_j1 and s.layer_norm is not None:
        token_last = route.token_last and m.axis == "token"
        w, b, eps = s.layer_norm
        h = permuted_layer_norm(x, w, b, eps, *_j1(m, token_last))
        if h is not None:
            return _after_input(m, h, x.shape, token_last, route, residual)
    return mlp_bsc(m, x if s.norm is None else s.norm(x), route, residual)


def mlp_bsc(m: MlpSpec, x: Tensor, route: Route, residual: Tensor | None = None) -> Tensor:
    """The mixing MLP on ``(B, S, C)`` (plus ``residual`` where given)."""
    B, S, C = x.shape
    token_last = route.token_last and m.axis == "token"
    if m.perm_in is None:
        h = x.transpose(1, 2).contiguous() if token_last else x
    else:
        x = autocast_input(x)  # the cast the first product makes anyway: J_1 then moves half the bytes
        h = permute_last(x.reshape(B, S * C), *_j1(m, token_last))
    return _after_input(m, h, x.shape, token_last, route, residual)


def _j1(m: MlpSpec, token_last: bool) -> tuple[Tensor, Tensor]:
    """``J_1`` as ``(idx, inv)`` on the ``(B, S*C)`` view, into channel-major storage where ``token_last``."""
    t = perm_tables(m.perm_in, m.num_tokens, m.dim)
    return t.to_cm if token_last else t.rm


def _after_input(m: MlpSpec, h: Tensor, shape: tuple[int, ...], token_last: bool, route: Route,
                 residual: Tensor | None) -> Tensor:
    """The MLP after ``J_1`` (or the transposed copy): ``h`` holds ``(B, C, S)`` storage where ``token_last``,
    else ``(B, S, C)``; ``residual`` is added to the output (with ``J_2`` in one pass where it can)."""
    B, S, C = shape
    h = _inner(m, h.view(B, C, S), "last", route) if token_last else _inner(m, h.view(B, S, C), "bsc", route)
    if m.perm_out is None:
        y = h.transpose(1, 2).contiguous() if token_last else h
    else:
        t = perm_tables(m.perm_out, S, C)
        idx, inv = t.from_cm if token_last else t.rm
        if residual is not None and route.fuse_j2_add:
            out = permute_add(h, idx, inv, residual)
            if out is not None:
                return out
        y = permute_last(h.reshape(B, S * C), idx, inv).view(B, S, C)
    return y if residual is None else residual + y


def _inner(m: MlpSpec, x: Tensor, mode: str, route: Route) -> Tensor:
    """``L_k(act(... L_1(x)))`` without ``J_1``/``J_2``. ``mode``: ``"bsc"`` (``(B, S, C)``), ``"sbc"``
    (``(S, B, C)``) or ``"last"`` (the mixed axis is the last one)."""
    onednn = route.onednn_token if m.axis == "token" else route.onednn_channel
    h = _linear(m.axis, x, m.weights[0], m.biases[0], mode, onednn)
    for w, b in zip(m.weights[1:], m.biases[1:], strict=True):
        h = _linear(m.axis, m.act(h), w, b, mode, onednn)
    return h


def _linear(axis: str, h: Tensor, w: Tensor, b: Tensor | None, mode: str, onednn: bool) -> Tensor:
    if axis == "channel" or mode == "last":  # float32 on the CPU: a 1x1 convolution (oneDNN) where the route says
        return linear_last(h, w, b, onednn)
    if mode == "bsc":  # W @ X on (B, S, C) as a 1x1 convolution: no transposed copies
        return F.conv1d(h, w.unsqueeze(-1), b)
    S, B, C = h.shape  # W @ X for all examples at once: one product on the (S, B*C) view, bias fused
    return linear_first(w, h.reshape(S, B * C), b, onednn).view(-1, B, C)


# ------------------------------------------------------------------------------------------ token-major
def sublayer_sbc(s: SublayerSpec, x: Tensor, route: Route) -> Tensor:
    """:func:`sublayer_bsc` on the token-major layout ``(S, B, C)`` (LayerNorm is over ``C`` in both)."""
    h = x if s.norm is None else s.norm(x)
    if s.mlp.module is not None:
        y = s.mlp.module(h.transpose(0, 1)).transpose(0, 1).contiguous()
    else:
        y = mlp_sbc(s.mlp, h, route)
    if s.outer_act is not None:
        y = s.outer_act(y)
    if not s.residual:
        return y
    return x + (y if s.drop_path is None else s.drop_path(y, 1))


def mlp_sbc(m: MlpSpec, x: Tensor, route: Route) -> Tensor:
    """The mixing MLP on ``(S, B, C)``, the same values, no transposed copies without permutations.

    RP permutations gather on the batch-major ``(B, S*C)`` view: ``J_1`` casts, transposes and gathers in one
    pass, and channel mixing runs between ``J_1`` and ``J_2`` in that layout, so the channel sublayer transposes
    only on its way in and out."""
    if m.perm_in is None and m.perm_out is None:
        return _inner(m, x, "sbc", route)
    S, B, C = x.shape
    token = m.axis == "token"
    h = x
    if m.perm_in is not None:  # the first product casts anyway: cast in the same pass
        h = gather_sbc_to_bsc(x, *perm_tables(m.perm_in, S, C).rm, autocast_dtype(x)).view(B, S, C)
        if token:  # the token GEMM wants (S, B*C)
            h = h.transpose(0, 1).contiguous()
    # channel mixing takes any row order of (tokens x examples, C): it stays batch-major after J_1
    batch_major = m.perm_in is not None and not token
    h = _inner(m, h, "bsc" if batch_major else "sbc", route)
    if m.perm_out is None:
        return h.transpose(0, 1).contiguous() if batch_major else h
    flat = h.reshape(B, S * C) if batch_major else h.transpose(0, 1).reshape(B, S * C)
    # contiguous: a residual add of mixed dtypes over a strided operand is slower than this copy + add
    return permute_last(flat, *perm_tables(m.perm_out, S, C).rm).view(B, S, C).transpose(0, 1).contiguous()


# ------------------------------------------------------------------------------------------ S-Mixer chain
def run_chain(specs: Sequence[BlockSpec], x: Tensor, route: Route) -> Tensor:
    """The S-Mixer's steps ``x -> act(J_2 f(J_1 x))`` in a row (docs/theory.md (3), §4.3), consecutive
    permutations composed into one gather: the same values as step by step."""
    steps = [s for b in specs for s in b]  # type: ignore[union-attr]
    sbc = route.layout == "sbc"
    S, C = steps[0].mlp.num_tokens, steps[0].mlp.dim
    permute = permute_sbc if sbc else permute_bsc
    if steps[0].mlp.perm_in is not None:
        x = permute(x, *perm_tables(steps[0].mlp.perm_in, S, C).rm)
    for k, s in enumerate(steps):
        m = s.mlp
        x = _inner(m, x, "sbc" if sbc else "bsc", route)
        out = None if m.perm_out is None else perm_tables(m.perm_out, S, C).rm
        nxt_perm = steps[k + 1].mlp.perm_in if k + 1 < len(steps) else None
        nxt = None if nxt_perm is None else perm_tables(nxt_perm, S, C).rm
        idx = compose_gathers(None if out is None else out[0], None if nxt is None else nxt[0])
        if idx is not None:
            inv = (out[1] if nxt is None else nxt[1] if out is None else None)  # type: ignore[index]
            x = permute(x, idx, inv)
        x = s.outer_act(x)  # type: ignore[misc]
    return x
