"""The CPU heap's reuse of freed memory (glibc), which training steps on the CPU depend on for speed."""

from __future__ import annotations

import ctypes

__all__ = ["keep_freed_memory"]


def keep_freed_memory(mmap_below: int = 32 << 20, trim_above: int = 1 << 30) -> bool:
    """Let glibc reuse freed memory instead of handing it back to the OS (process-wide; ``False`` if not glibc).

    Blocks under ``mmap_below`` bytes come from the heap (``M_MMAP_THRESHOLD``) and the heap is not trimmed until
    ``trim_above`` bytes are free at its top (``M_TRIM_THRESHOLD``). Writing into freshly mapped pages is
    several times slower than into reused ones, and by default glibc unmaps and re-faults thousands of pages per
    CPU training step; with this the pages are reused (figures in docs/speed.md). Freed memory stays with the
    process, up to ``trim_above`` bytes above what it uses.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, int(mmap_below)) == 1 and libc.mallopt(-1, int(trim_above)) == 1)
    except (OSError, AttributeError):
        return False
