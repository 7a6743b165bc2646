"""The pieces of the training recipe: AdamW parameter groups, the warmup-cosine schedule, autocast, evaluation.

:mod:`widesparse.train.engine` re-exports these names. Imports :mod:`widesparse.data.datasets` and the
``StructuredLinear`` base (for the decay groups).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from widesparse.data.datasets import Split, iterate_batches
from widesparse.layers import StructuredLinear

__all__ = ["autocast", "eval_sums", "eval_sums_batches", "evaluate", "param_groups", "warmup_cosine"]


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier per step: linear ramp to 1 over ``warmup_steps``, then cosine down to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: weights decay, biases and norm scales do not.

    Weights are matrices (``ndim >= 2``) and every non-bias parameter of a structured layer: a sparse layer
    stores its weights as a 1-D vector of values, and must decay like the masked layer it equals.
    """
    weights = {id(p) for p in model.parameters() if p.ndim >= 2}
    for m in model.modules():
        if isinstance(m, StructuredLinear):
            weights |= {id(p) for n, p in m.named_parameters(recurse=False) if n != "bias"}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) in weights], "weight_decay": weight_decay},
        {"params": [p for p in trainable if id(p) not in weights], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


@torch.no_grad()
def eval_sums(
    model: nn.Module,
    data: Split,
    batch_size: int,
    transform: Callable[[Tensor], Tensor] | None = None,
    precision: str = "fp32",
) -> Tensor:
    """Summed cross-entropy (no smoothing), number correct and number of examples of ``model`` on ``data``
    (eval mode), as one float64 tensor of 3 (summable over shards). ``transform`` maps each input batch first."""
    batches = iterate_batches(data.x, data.y, max(batch_size, 256))
    return eval_sums_batches(model, batches, data.y.device, transform, precision)


@torch.no_grad()
def eval_sums_batches(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    device: torch.device,
    transform: Callable[[Tensor], Tensor] | None = None,
    precision: str = "fp32",
) -> Tensor:
    """:func:`eval_sums` over any iterable of ``(x, y)`` batches (e.g. a streaming loader's): summed loss,
    number correct, number of examples, as one float64 tensor of 3 on ``device``."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for xb, yb in batches:
        if not len(yb):
            continue
        with autocast(device, precision):
            logits = model(transform(xb) if transform is not None else xb)
        sums[0] += F.cross_entropy(logits.float(), yb, reduction="sum").double()
        sums[1] += (logits.argmax(dim=1) == yb).sum()
        sums[2] += len(yb)
    return sums


def evaluate(
    model: nn.Module,
    data: Split,
    batch_size: int,
    transform: Callable[[Tensor], Tensor] | None = None,
    precision: str = "fp32",
) -> tuple[float, float]:
    """Mean cross-entropy (no smoothing) and accuracy of ``model`` on ``data``, in eval mode."""
    loss_sum, correct, n = eval_sums(model, data, batch_size, transform, precision).tolist()
    return loss_sum / n, correct / n


def autocast(device: torch.device, precision: str) -> torch.autocast:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
