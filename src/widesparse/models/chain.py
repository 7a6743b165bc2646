"""The S-Mixer's permutations composed across sublayers, and which blocks that applies to.

An elementwise activation commutes with permutations, so in an RP S-Mixer (no LayerNorm, no skip) ``J_2`` of
one mixing step and ``J_1`` of the next compose into a single gather (PAPER.md §4.3).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from widesparse.models.blocks import MixerBlock, MixingMlp
from widesparse.ops.gathers import compose_gathers, permute_bsc, permute_sbc

__all__ = ["chainable", "permutes", "sublayer_chain"]


def sublayer_chain(blocks: Sequence[nn.Module], x: Tensor, sbc: bool) -> Tensor | None:
    """The S-Mixer's mixing steps ``x -> act(J_2 f(J_1 x))`` in a row, with consecutive permutations composed.

    Since ``act`` is elementwise, ``J_1' act(J_2 z) = act(J_1' J_2 z)``: one gather between two steps instead of
    two (2L + 1 gathers for L blocks instead of 4L), the same values. Returns ``None`` where it does not apply:
    blocks with LayerNorm or skips (the RP-Mixer), or no permutations at all.
    """
    if not chainable(blocks) or not permutes(blocks):
        return None
    steps = [(b.mlp_tokens if i == 0 else b.mlp_channels, b.act) for b in blocks for i in (0, 1)]
    permute = permute_sbc if sbc else permute_bsc
    if steps[0][0].idx_in is not None:
        x = permute(x, steps[0][0].idx_in, steps[0][0].inv_in)
    for k, (mlp, act) in enumerate(steps):
        x = mlp.forward_inner(x, sbc)
        nxt = steps[k + 1][0].idx_in if k + 1 < len(steps) else None
        idx = compose_gathers(mlp.idx_out, nxt)
        if idx is not None:
            x = permute(x, idx, mlp.inv_out if nxt is None else None)
        x = act(x)
    return x


def chainable(blocks: Sequence[nn.Module]) -> bool:
    """Whether :func:`sublayer_chain` can run ``blocks``: S-Mixer blocks (outer activation, no LayerNorm, no skip)."""
    return all(isinstance(b, MixerBlock) and b.act is not None and not b.residual
               and isinstance(b.norm1, nn.Identity) and isinstance(b.norm2, nn.Identity) for b in blocks)


def permutes(blocks: Sequence[nn.Module]) -> bool:
    """Whether any mixing MLP of ``blocks`` carries RP permutations (``J_1`` or ``J_2``)."""
    return any(isinstance(m, MixingMlp) and (m.idx_in is not None or m.idx_out is not None)
               for b in blocks for m in b.modules())
