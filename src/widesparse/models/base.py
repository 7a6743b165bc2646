"""The model surface of the Mixer family and the SW-MLP (after timm's ``MlpMixer``).

A model using it has ``stem`` (images -> ``(B, S, C)``), ``blocks`` whose elements offer ``forward_token`` and
``forward_channel`` (the two mixing sublayers), ``norm`` (final LayerNorm over channels), ``head``, ``dim`` and
``num_classes``; it then gets ``forward_features`` here and, from :class:`~widesparse.models.surface.ModelSurface`,
``forward_head``, ``forward_intermediates`` (the CKA tap), ``feature_names``, ``reset_classifier`` and gradient
checkpointing.
"""

from __future__ import annotations

from torch import Tensor, nn

from widesparse.models.surface import ModelSurface, Step, collect_intermediates, resolve_indices
from widesparse.ops.mixer import run_blocks
from widesparse.ops.route import BlockSpec, Route, choose_route, hooked

__all__ = ["MixerSurface", "collect_intermediates", "resolve_indices"]


class MixerSurface(ModelSurface):
    """Mixin with the surface of every token-mixing model (see the module docstring for what it needs).

    ``layout`` picks the route of :meth:`forward_features`: ``"auto"`` (the router decides from the input and the
    blocks), ``"bsc"`` (batch-major), ``"sbc"`` (token-major) or ``"plain"`` (the modules' own forwards, the
    math); ``widesparse.ops.fast_routes(False)`` runs every model plain. :meth:`route` tells which one runs.
    """

    stem: nn.Module
    blocks: nn.Sequential
    norm: nn.Module
    head: nn.Module
    dim: int
    num_classes: int
    grad_checkpointing: bool = False
    layout: str = "auto"

    def _embed(self, x: Tensor) -> Tensor:
        return self.stem(x)

    def _steps(self) -> list[tuple[str, Step]]:
        """The ``2 * depth`` mixing sublayers ``blocks.{i}.token`` and ``blocks.{i}.channel``: the blocks' own
        ``forward_token``/``forward_channel``, the plain math (what a hook on a block sees)."""
        return [(f"blocks.{i}.{kind}", getattr(blk, f"forward_{kind}")) for i, blk in enumerate(self.blocks)
                for kind in ("token", "channel")]

    def mixing_specs(self) -> list[BlockSpec] | None:
        """Each block's mixing sublayers as :class:`~widesparse.ops.route.SublayerSpec` pairs (``None`` for a block
        to be called as a module, as one with hooks); ``None`` where the blocks describe none (the SW-MLP's) or
        ``blocks`` itself has hooks."""
        if hooked(self.blocks) or not all(hasattr(b, "mixing_specs") for b in self.blocks):
            return None
        return [b.mixing_specs() for b in self.blocks]

    def route(self, x: Tensor) -> Route:
        """The :class:`~widesparse.ops.route.Route` :meth:`forward_features` takes for images ``x``."""
        return self._choose_route(x, self.mixing_specs())

    def _choose_route(self, x: Tensor, specs: list[BlockSpec] | None) -> Route:
        stem_sbc = hasattr(self.stem, "forward_sbc") and not hooked(self.stem)
        return choose_route(x, specs, self.layout, token_major_stem=stem_sbc,
                            grad_checkpointing=self.grad_checkpointing)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images ``(B, in_chans, H, W)`` -> final normalised token features ``(B, S, C)``.

        The blocks' math (docs/theory.md (1)-(3)) runs on the route :func:`~widesparse.ops.route.choose_route`
        picks from ``x``, the blocks' structure and ``layout`` (``"auto"``, ``"bsc"``, ``"sbc"`` or ``"plain"``).
        On ``"sbc"`` the stream is token-major ``(S, B, C)`` and the result a ``(B, S, C)`` view of it; every route
        gives the values of the plain one (to rounding).
        """
        specs = self.mixing_specs()
        route = self._choose_route(x, specs)
        sbc = route.layout == "sbc"
        h = self.stem.forward_sbc(x) if sbc else self.stem(x)
        h = self.norm(run_blocks(route, self.blocks, specs, h))
        return h.transpose(0, 1) if sbc else h
