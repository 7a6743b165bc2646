"""Activations by name (``"gelu"``, ``"relu"``, ...) and :class:`GELU`, the package's default activation."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from widesparse.ops.cpu_kernels import gelu

__all__ = ["ACT_LAYERS", "GELU", "resolve_act_layer"]


class GELU(nn.GELU):
    """:class:`torch.nn.GELU` (same arguments, no parameters) whose bfloat16 CPU backward is :func:`gelu`'s."""

    def forward(self, input: Tensor) -> Tensor:
        return gelu(input, self.approximate)


ACT_LAYERS: dict[str, type[nn.Module]] = {
    "gelu": GELU,  # nn.GELU with the table backward in bf16 on the CPU (widesparse.ops.cpu_kernels)
    "relu": nn.ReLU,
    "identity": nn.Identity,
    "linear": nn.Identity,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid,
}


def resolve_act_layer(act: str | Callable[[], nn.Module] | None) -> Callable[[], nn.Module]:
    """An activation factory from a name (``gelu``, ``relu``, ``identity``, ...) or a module class."""
    if act is None:
        return GELU
    if isinstance(act, str):
        key = act.lower()
        if key not in ACT_LAYERS:
            raise ValueError(f"unknown activation {act!r}; valid: {', '.join(ACT_LAYERS)}")
        return ACT_LAYERS[key]
    return act
