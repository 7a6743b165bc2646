"""What a model's seeds fix, in one place: per-layer structure seeds and the weight-init generator.

Every model takes ``seed`` (what it fixed before the explicit seeds existed, unchanged) and ``init_seed``; the
Mixer family adds ``perm_seed`` and the SW-MLP ``mask_seed``:

* ``perm_seed`` (default ``seed``): the RP-Mixer's permutations ``J_1``, ``J_2`` (docs/theory.md §4.3); block ``i``
  draws from :func:`layer_seeds` ``(perm_seed, i)``.
* ``mask_seed`` (default ``seed``): the SW-MLP's sparse masks; block ``i`` from ``layer_seeds(mask_seed, i, 7)``.
* ``init_seed`` (default ``None``): the weights, drawn from one ``torch.Generator`` seeded with it (CPU numbers,
  the same on every device), so they are independent of the global RNG; ``None`` draws them from the global RNG
  (``torch.manual_seed``). The Monarch MLP's ``seed`` is its ``init_seed`` (it has no other random draw).

The streams are separate: NumPy ``SeedSequence`` over ``(seed, block, *salt)`` for structure, a torch generator
(or the global RNG) for weights. So the permutations never change the weights, nor the weights the structure. The
SW-MLP draws each layer's weights in its mask's CSR order (one value per connection), so another mask gets other
weight values (from the same distribution) under the same ``init_seed``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = ["layer_seeds", "init_generator", "draw_"]


def layer_seeds(seed: int, block: int, count: int, *salt: int) -> tuple[int, ...]:
    """``count`` independent 30-bit seeds for block ``block`` of a model seeded ``seed`` (``salt`` separates
    the draws of different models: the SW-MLP's masks use salt 7)."""
    state = np.random.SeedSequence([int(seed), int(block), *map(int, salt)]).generate_state(count)
    return tuple(int(s) >> 2 for s in state)


def init_generator(init_seed: int | None) -> torch.Generator | None:
    """A CPU generator seeded with ``init_seed``, or ``None`` (draw from the global RNG) when it is ``None``."""
    return None if init_seed is None else torch.Generator().manual_seed(int(init_seed))


def draw_(t: Tensor, init: Callable[..., Tensor], generator: torch.Generator | None, **kwargs: object) -> None:
    """``init(t, **kwargs)`` in place (an ``nn.init``-style function taking ``generator``).

    Without a generator this is the plain call on the global RNG. With one the numbers are drawn into a CPU tensor
    of ``t``'s shape and dtype and copied, so a seed gives the same weights on every device; meta tensors are left.
    """
    if generator is None:
        init(t, **kwargs)
    elif not t.is_meta:
        tmp = torch.empty(t.shape, dtype=t.dtype)
        init(tmp, generator=generator, **kwargs)
        with torch.no_grad():
            t.copy_(tmp)
