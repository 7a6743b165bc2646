"""The model surface every widesparse model offers (after timm's): head, pooling, intermediates, checkpointing.

A model using :class:`ModelSurface` has ``head``, ``norm`` (final normalisation over channels; ``nn.Identity``
where there is none), ``num_features`` and ``num_classes``, and defines ``forward_features`` (images -> features
``(B, S, C)``) and the two intermediates hooks: ``_embed`` (images -> the stream the steps act on) and ``_steps``
(named steps, one per returned feature). It then gets ``forward``, ``forward_head``, ``reset_classifier``,
``feature_names``, ``forward_intermediates`` (the CKA tap) and the gradient-checkpointing switch. Pooling is the
token mean; a model whose stream is not ``(B, S, C)`` overrides ``_as_tokens`` (and ``_pool`` for another head).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

from torch import Tensor, nn

from widesparse.linalg import vec

__all__ = ["ModelSurface", "collect_intermediates", "resolve_indices"]

Step = Callable[[Tensor], Tensor]


class ModelSurface(nn.Module):
    """Mixin with the surface shared by every model (see the module docstring for what a model provides)."""

    head: nn.Module
    norm: nn.Module
    num_features: int
    num_classes: int
    grad_checkpointing: bool = False
    _intermediates_what: str = "mixing sublayers"

    # --------------------------------------------------------------------------------------- model hooks
    def forward_features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _embed(self, x: Tensor) -> Tensor:
        """Images -> the stream the :meth:`_steps` act on."""
        raise NotImplementedError

    def _steps(self) -> list[tuple[str, Step]]:
        """``(name, step)`` pairs in order: the features :meth:`forward_intermediates` returns follow each step."""
        raise NotImplementedError

    def _as_tokens(self, h: Tensor) -> Tensor:
        """The stream as features ``(B, S, C)`` (the identity where the stream already is)."""
        return h

    def _pool(self, x: Tensor) -> Tensor:
        """Features ``(B, S, C)`` -> ``(B, num_features)``: the token mean."""
        return x.mean(dim=1)

    def _init_head(self, head: nn.Linear) -> None:
        """A new head starts at zero (the Mixer's init)."""
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)

    # ------------------------------------------------------------------------------------------- surface
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass to save memory (outputs are unchanged)."""
        self.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head (``num_classes=0``: no head, features out)."""
        p = next(self.parameters())
        self.num_classes = num_classes
        if num_classes > 0:
            self.head = nn.Linear(self.num_features, num_classes, device=p.device, dtype=p.dtype)
            self._init_head(self.head)
        else:
            self.head = nn.Identity()

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pooling (:meth:`_pool`) then the linear head (``pre_logits=True`` stops before the head)."""
        x = self._pool(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def feature_names(self) -> list[str]:
        """Names of the steps whose outputs :meth:`forward_intermediates` returns."""
        return [name for name, _ in self._steps()]

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: Literal["NLC", "vec"] = "NLC",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """The stream after every step of :meth:`feature_names` (the Mixer: every token and channel sublayer).

        Args:
            indices: ``None`` for all, an int ``n`` for the last ``n``, or a list of step indices (negative
                allowed) into :meth:`feature_names`.
            norm: apply the final normalisation ``norm`` to each returned feature.
            stop_early: stop after the last requested step (then the final features are not computed).
            output_fmt: ``"NLC"`` gives ``(B, S, C)``; ``"vec"`` gives column-major ``vec X`` of shape ``(B, S*C)``.
            intermediates_only: return only the list.

        Returns the list, or ``(final features (B, S, C), list)``.
        """
        if output_fmt not in ("NLC", "vec"):
            raise ValueError(f"output_fmt must be 'NLC' or 'vec', got {output_fmt!r}")

        def feature(h: Tensor) -> Tensor:
            f = self._as_tokens(h)
            f = self.norm(f) if norm else f
            return vec(f) if output_fmt == "vec" else f

        def final(h: Tensor) -> Tensor:
            return self.norm(self._as_tokens(h))

        steps = [step for _, step in self._steps()]
        return collect_intermediates(steps, self._embed(x), indices, stop_early, intermediates_only, feature, final,
                                     self._intermediates_what)


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
    steps: Sequence[Step],
    h: Tensor,
    indices: int | Sequence[int] | None,
    stop_early: bool,
    intermediates_only: bool,
    feature: Step,
    final: Step,
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
