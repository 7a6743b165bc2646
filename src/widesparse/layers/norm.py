"""Normalisation layers: :class:`LayerNorm`, the one every model of the package uses."""

from __future__ import annotations

from torch import Tensor, nn

from widesparse.ops.cpu_kernels import layer_norm

__all__ = ["LayerNorm"]


class LayerNorm(nn.LayerNorm):
    """:class:`torch.nn.LayerNorm` (same arguments, same state dict) that runs :func:`layer_norm`.

    On bfloat16 CPU rows with float32 weight and bias it runs the compiled kernel, forward and backward (faster
    than ATen's). Outputs match ATen's within one bfloat16 rounding step (the row statistics are summed in another
    order), and the weight and bias gradients are float32 sums: PyTorch 2.13's CPU kernel sums them in bfloat16
    for a bfloat16 input, which drifts far from a float64 reference over many rows.
    """

    def forward(self, input: Tensor) -> Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
