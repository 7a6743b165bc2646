"""The one place that picks how a Mixer-family forward runs: :func:`choose_route`, once per forward.

The models write the forward as the math (docs/theory.md (1)-(3), (14)); :mod:`widesparse.ops.mixer` holds
faster executors that compute the same values. The model hands :func:`choose_route` the input and a
description of its blocks (:class:`SublayerSpec` per mixing sublayer, plain tensors and callables), and gets a
:class:`Route` back; nothing else reads dtype, autocast, threads or oneDNN to pick a layout.

Routes (``Route.layout``):

* ``"plain"``: the modules' own forwards, the math as written (``layout="plain"``, inside ``fast_routes(False)``,
  or for blocks that describe no mixing sublayers, such as the SW-MLP's).
* ``"bsc"``: batch-major ``(B, S, C)`` residual stream; token mixing as a 1x1 convolution over it, or over
  channel-major ``(B, C, S)`` storage (``token_last``, where the float32 oneDNN route applies or products run in
  bf16 on the CPU: the RP-Mixer's ``J_1``/``J_2`` then gather straight into and out of that storage); on the CPU
  the compiled LayerNorm + ``J_1`` (bf16) and ``J_2`` + residual kernels where they apply.
* ``"sbc"``: token-major ``(S, B, C)`` stream, where token mixing is one ``(D_S, S) @ (S, B*C)`` product; taken
  by ``"auto"`` under bf16/fp16 autocast or low-precision inputs, except for the RP-Mixer in bf16 on the CPU.
* ``chain``: the S-Mixer's permutations composed across sublayers (an elementwise activation commutes with
  permutations, docs/theory.md §3.3), in either layout, when no gradient checkpointing is asked for.
* ``checkpoint``: each block recomputed in the backward pass (``set_grad_checkpointing``).
* ``onednn_token``/``onednn_channel``: the float32 CPU products as 1x1 convolutions (oneDNN), where the product is
  large enough and threads allow (:func:`widesparse.ops.matmul.onednn_route`).

Settings: ``model.layout`` (``"auto"``, ``"bsc"``, ``"sbc"`` or ``"plain"``), the :func:`fast_routes` context
manager (``fast_routes(False)``: every model runs ``"plain"``), and ``WIDESPARSE_CPU_KERNELS=0`` (no compiled CPU
kernels; see :mod:`widesparse.ops.cpu_kernels`). Modules with hooks are called (their hooks see them run).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor, nn

from widesparse.ops import cpu_kernels, matmul

__all__ = ["MlpSpec", "SublayerSpec", "BlockSpec", "Route", "LAYOUTS", "choose_route", "fast_routes",
           "fast_routes_enabled", "hooked"]

LAYOUTS = ("auto", "bsc", "sbc", "plain")


class MlpSpec(NamedTuple):
    """A mixing MLP ``unvec(J_2 L_k(act(... L_1(J_1 vec X))))`` on ``X`` of shape ``(B, S, C)`` (docs/theory.md (14)).

    ``weights``/``biases``: the small factors of its layers, ``(out, in)`` over the mixed axis (``axis``:
    ``"token"`` mixes the ``S`` axis, ``"channel"`` the ``C`` axis); ``act`` between them; ``perm_in``/``perm_out``:
    ``J_1``/``J_2`` as vec-space index tensors (``None``: identity). ``module``: where set, the executors call it
    on ``(B, S, C)`` instead (it has hooks, or a structure the executors do not cover).
    """

    axis: str
    num_tokens: int
    dim: int
    weights: tuple[Tensor, ...]
    biases: tuple[Tensor | None, ...]
    act: Callable[[Tensor], Tensor] | None
    perm_in: Tensor | None
    perm_out: Tensor | None
    module: Callable[[Tensor], Tensor] | None = None


class SublayerSpec(NamedTuple):
    """One mixing sublayer ``x -> x + drop_path(outer_act(mlp(norm(x))))`` (docs/theory.md (1)-(3)).

    ``norm``: ``None`` for none; ``layer_norm``: ``(weight, bias, eps)`` where ``norm`` is a LayerNorm over ``C``
    that the compiled LayerNorm + ``J_1`` pass may replace; ``residual=False`` drops the skip (the S-Mixer);
    ``drop_path``: ``(y, batch_dim) -> y`` or ``None``.
    """

    mlp: MlpSpec
    norm: Callable[[Tensor], Tensor] | None
    layer_norm: tuple[Tensor, Tensor, float] | None
    outer_act: Callable[[Tensor], Tensor] | None
    residual: bool
    drop_path: Callable[[Tensor, int], Tensor] | None


# A block: its token and channel sublayers, or None (the block module is called: it has hooks)
BlockSpec = tuple[SublayerSpec, SublayerSpec] | None


class Route(NamedTuple):
    """How one forward runs (see the module docstring): ``layout`` ``"plain"``, ``"bsc"`` or ``"sbc"`` and the
    executors' switches; decided once per forward and kept for a checkpointed block's recomputation."""

    layout: str
    token_last: bool = False
    chain: bool = False
    checkpoint: bool = False
    fuse_norm_j1: bool = False
    fuse_j2_add: bool = False
    onednn_token: bool = False
    onednn_channel: bool = False


_FAST = [True]


@contextmanager
def fast_routes(enabled: bool = True) -> Iterator[None]:
    """Within the block, ``fast_routes(False)`` runs every Mixer-family forward on the plain route (the math)."""
    before = _FAST[0]
    _FAST[0] = bool(enabled)
    try:
        yield
    finally:
        _FAST[0] = before


def fast_routes_enabled() -> bool:
    """Whether the fast executors may run (``False`` inside ``fast_routes(False)``)."""
    return _FAST[0]


def hooked(module: nn.Module) -> bool:
    """Whether ``module`` has forward or backward hooks of its own (then it must be called, not bypassed)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _global_hooks() -> bool:
    m = nn.modules.module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks
                or m._global_backward_pre_hooks)


def chainable(specs: Sequence[BlockSpec]) -> bool:
    """Whether the blocks are S-Mixer steps ``act(mlp(x))`` (no norm, no skip) the chain executor covers."""
    return bool(specs) and all(
        b is not None and all(s.norm is None and not s.residual and s.outer_act is not None
                              and s.mlp.module is None for s in b)
        for b in specs
    )


def permutes(specs: Sequence[BlockSpec]) -> bool:
    """Whether any mixing MLP carries RP permutations (``J_1`` or ``J_2``)."""
    return any(b is not None and any(s.mlp.perm_in is not None or s.mlp.perm_out is not None for s in b)
               for b in specs)


def choose_route(
    x: Tensor,
    specs: Sequence[BlockSpec] | None,
    layout: str = "auto",
    *,
    token_major_stem: bool = False,
    grad_checkpointing: bool = False,
) -> Route:
    """The route of one forward of images ``x`` through blocks described by ``specs`` (``None``: blocks the
    executors do not know, run as modules); ``token_major_stem``: the stem can embed straight into ``(S, B, C)``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'auto', 'bsc', 'sbc' or 'plain', got {layout!r}")
    checkpoint = grad_checkpointing and torch.is_grad_enabled()
    if layout == "plain" or specs is None or not specs or not _FAST[0] or _global_hooks():
        return Route("plain", checkpoint=checkpoint)
    rp, chain_ok = permutes(specs), chainable(specs)
    low = matmul.cpu_low_precision(x)
    if layout == "sbc":
        sbc = token_major_stem
    elif layout == "bsc":
        sbc = False
    else:
        low_any = torch.is_autocast_enabled(x.device.type) or x.dtype in (torch.bfloat16, torch.float16)
        sbc = token_major_stem and low_any and not (low and rp and not chain_ok)
    chain = chain_ok and rp and not grad_checkpointing
    S, C, D_S, D_C = specs_shape(specs)
    numel = x.shape[0] * S * C  # of the (B, S, C) stream, in the dtype of x
    onednn = {"onednn_token": matmul.onednn_route(x.device.type, x.dtype, numel, D_S),
              "onednn_channel": matmul.onednn_route(x.device.type, x.dtype, numel, D_C)}
    if sbc:
        return Route("sbc", chain=chain, checkpoint=checkpoint, **onednn)
    kernels = x.device.type == "cpu" and rp and not torch.compiler.is_compiling() and cpu_kernels.enabled()
    return Route("bsc", token_last=low or onednn["onednn_token"], chain=chain, checkpoint=checkpoint,
                 fuse_norm_j1=kernels and low, fuse_j2_add=kernels, **onednn)


def specs_shape(specs: Sequence[BlockSpec]) -> tuple[int, int, int, int]:
    """``(S, C, D_S, D_C)``: tokens, channels and the first widths of the token and channel MLPs (each product's
    size decides its oneDNN route), from the first described block."""
    for b in specs:
        if b is not None:
            m = b[0].mlp
            return m.num_tokens, m.dim, m.weights[0].shape[0], b[1].mlp.weights[0].shape[0]
    return 0, 0, 0, 0
