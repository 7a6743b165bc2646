"""Compatibility path: the code lives in :mod:`widesparse.analysis.profiling`.

This import path stays for outside scripts.
"""

from widesparse.analysis.profiling import *  # noqa: F403
from widesparse.analysis.profiling import __all__  # noqa: F401
