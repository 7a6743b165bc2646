"""The standard model surface shared by the Mixer family and the SW-MLP (after timm's ``MlpMixer``).

A model using it has ``stem`` (images -> ``(B, S, C)``), ``blocks`` whose elements offer ``forward_token`` and
``forward_channel`` (the two mixing sublayers), ``norm`` (final LayerNorm over channels), ``head``, ``dim`` and
``num_classes``; it then gets ``forward_features``, ``forward_head``, ``forward_intermediates`` (the CKA tap),
``feature_names``, ``reset_classifier`` and gradient checkpointing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from widesparse.models.chain import chainable, permutes, sublayer_chain
from widesparse.ops.matmul import cpu_low_precision

__all__ = ["MixerSurface", "collect_intermediates", "resolve_indices"]


class MixerSurface(nn.Module):
    """Mixin with the surface of every token-mixing model (see the module docstring for what it needs)."""

    stem: nn.Module
    blocks: nn.Sequential
    norm: nn.Module
    head: nn.Module
    dim: int
    num_classes: int
    grad_checkpointing: bool = False
    layout: str = "auto"

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass to save memory (outputs are unchanged)."""
        self.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head (``num_classes=0``: no head, features out)."""
        p = self.norm.weight
        self.num_classes = num_classes
        if num_classes > 0:
            self.head = nn.Linear(self.dim, num_classes, device=p.device, dtype=p.dtype)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        else:
            self.head = nn.Identity()

    def feature_names(self) -> list[str]:
        """Names of the 2 * depth mixing sublayers whose outputs :meth:`forward_intermediates` returns."""
        return [f"blocks.{i}.{kind}" for i in range(len(self.blocks)) for kind in ("token", "channel")]

    def _token_major(self, x: Tensor) -> bool:
        """Whether to run the ``(S, B, C)`` fast path (``layout``: ``"auto"``, ``"sbc"`` or ``"bsc"``).

        It needs a stem and blocks offering ``forward_sbc``. ``"auto"`` takes it under bf16/fp16 autocast or
        with low-precision inputs, where it measured faster (CPU, 2 threads: bf16 step 0.92x -> 1.04-1.10x of
        lucidrains' mlp-mixer); in fp32 the batch-major path measured as fast or faster, so ``"auto"`` keeps it.
        Except the RP-Mixer in bf16 on the CPU: batch-major, its gathers land straight in the storage each product
        wants (no transposed copies) and its step measured 1.07x faster than token-major.
        """
        layout = getattr(self, "layout", "auto")
        if layout not in ("auto", "sbc", "bsc"):
            raise ValueError(f"layout must be 'auto', 'sbc' or 'bsc', got {layout!r}")
        if layout == "bsc" or not hasattr(self.stem, "forward_sbc"):
            return False
        if not all(hasattr(b, "forward_sbc") for b in self.blocks):
            return False
        if layout == "sbc":
            return True
        if not (torch.is_autocast_enabled(x.device.type) or x.dtype in (torch.bfloat16, torch.float16)):
            return False
        return not (cpu_low_precision(x) and permutes(self.blocks) and not chainable(self.blocks))

    def forward_features(self, x: Tensor) -> Tensor:
        """Images -> final normalised token features ``(B, S, C)``.

        On the token-major path (see :meth:`_token_major`) the residual stream is ``(S, B, C)``, where token
        mixing is one ``(D_S, S) @ (S, B*C)`` product and channel mixing one ``(S*B, C) @ (C, D_C)`` product,
        without transposed copies; the result is a ``(B, S, C)`` view of it, with the same values as the
        batch-major path (which :meth:`forward_intermediates` uses).
        """
        sbc = self._token_major(x)
        x = self.stem.forward_sbc(x) if sbc else self.stem(x)
        chained = None if self.grad_checkpointing else sublayer_chain(self.blocks, x, sbc)
        if chained is not None:  # RP S-Mixer: consecutive permutations composed into one gather
            x = chained
        elif self.grad_checkpointing and torch.is_grad_enabled():
            for blk in self.blocks:
                x = checkpoint(blk.forward_sbc if sbc else blk, x, use_reentrant=False)
        elif sbc:
            for blk in self.blocks:
                x = blk.forward_sbc(x)
        else:
            x = self.blocks(x)
        x = self.norm(x)
        return x.transpose(0, 1) if sbc else x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Token-mean pooling then the linear head (``pre_logits=True`` stops before the head)."""
        x = x.mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: Literal["NLC", "vec"] = "NLC",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Residual-stream features after every mixing sublayer (token and channel: ``2 * depth`` of them).

        Args:
            indices: ``None`` for all, an int ``n`` for the last ``n``, or a list of sublayer indices
                (negative allowed) into :meth:`feature_names`.
            norm: apply the final LayerNorm to each returned feature.
            stop_early: stop after the last requested sublayer (then the final features are not computed).
            output_fmt: ``"NLC"`` gives ``(B, S, C)``; ``"vec"`` gives column-major ``vec X`` of shape ``(B, S*C)``.
            intermediates_only: return only the list.
        """
        if output_fmt not in ("NLC", "vec"):
            raise ValueError(f"output_fmt must be 'NLC' or 'vec', got {output_fmt!r}")
        steps = [f for blk in self.blocks for f in (blk.forward_token, blk.forward_channel)]

        def feature(h: Tensor) -> Tensor:
            f = self.norm(h) if norm else h
            return f.transpose(1, 2).reshape(f.shape[0], -1) if output_fmt == "vec" else f

        return collect_intermediates(steps, self.stem(x), indices, stop_early, intermediates_only, feature, self.norm)


def resolve_indices(indices: int | Sequence[int] | None, n: int, what: str = "mixing sublayers") -> list[int]:
    """Sorted indices from ``None`` (all), an int (the last n) or a list (negative allowed) of ``n`` ``what``."""
    if indices is None:
        return list(range(n))
    if isinstance(indices, int):
        if not 0 < indices <= n:
            raise ValueError(f"indices={indices}: ask for between 1 and {n} final {what}")
        return list(range(n - indices, n))
    out = []
    for i in indices:
        if not -n <= i < n:
            raise ValueError(f"index {i} out of range for {n} {what}")
        out.append(i % n)
    return sorted(set(out))


def collect_intermediates(
    steps: Sequence[Callable[[Tensor], Tensor]],
    h: Tensor,
    indices: int | Sequence[int] | None,
    stop_early: bool,
    intermediates_only: bool,
    feature: Callable[[Tensor], Tensor],
    final: Callable[[Tensor], Tensor],
    what: str = "mixing sublayers",
) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
    """The loop of every ``forward_intermediates``: run ``steps`` on ``h``, keep ``feature(h)`` after the steps
    named by ``indices`` (see :func:`resolve_indices`), stop after the last one when asked, and return the list
    alone or ``(final(h), list)``."""
    n = len(steps)
    take = resolve_indices(indices, n, what)
    last = max(take) if (stop_early or intermediates_only) and take else n - 1
    feats: list[Tensor] = []
    for j in range(last + 1):
        h = steps[j](h)
        if j in take:
            feats.append(feature(h))
    if intermediates_only:
        return feats
    if last < n - 1:
        raise ValueError("stop_early=True leaves the final features uncomputed; use intermediates_only=True")
    return final(h), feats
