"""Compatibility path: the dense-product routes live in :mod:`widesparse.ops.matmul` and the heap setting in
:mod:`widesparse.ops.heap` (this import path stays for outside scripts)."""

from widesparse.ops.heap import keep_freed_memory
from widesparse.ops.matmul import *  # noqa: F403
from widesparse.ops.matmul import __all__ as _matmul_all

__all__ = [*_matmul_all, "keep_freed_memory"]
