"""Stochastic depth: :class:`DropPath` and the per-block rates."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["DropPath", "drop_path_rates"]


class DropPath(nn.Module):
    """Stochastic depth per example; ``rescale=True`` divides kept paths by the keep probability (timm)."""

    def __init__(self, p: float = 0.0, rescale: bool = True) -> None:
        super().__init__()
        self.p, self.rescale = float(p), rescale

    def forward(self, x: Tensor, batch_dim: int = 0) -> Tensor:
        """Drop whole examples along ``batch_dim`` (1 in the ``(S, B, C)`` layout; same random draws)."""
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = [1] * x.ndim
        shape[batch_dim] = x.shape[batch_dim]
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask / keep if self.rescale else x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}, rescale={self.rescale}"


def drop_path_rates(rate: float, depth: int, schedule: str) -> list[float]:
    """Per-block stochastic-depth rates: ``linear`` (``rate * i / (depth - 1)``) or ``uniform``."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {rate}")
    if schedule == "uniform":
        return [rate] * depth
    if schedule != "linear":
        raise ValueError(f"drop_path_schedule must be 'linear' or 'uniform', got {schedule!r}")
    return [rate * i / max(depth - 1, 1) for i in range(depth)]
