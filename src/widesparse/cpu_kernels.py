"""Compatibility path: the compiled CPU kernels live in :mod:`widesparse.ops.cpu_kernels`, the modules that use
them in :mod:`widesparse.layers` (this import path stays for outside scripts)."""

from widesparse.layers.activation import GELU
from widesparse.layers.norm import LayerNorm
from widesparse.ops.cpu_kernels import *  # noqa: F403
from widesparse.ops.cpu_kernels import __all__ as _kernels_all

__all__ = [*_kernels_all, "GELU", "LayerNorm"]
