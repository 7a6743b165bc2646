"""Compatibility path: the code lives in :mod:`widesparse.analysis.theory`.

This import path stays for outside scripts.
"""

from widesparse.analysis.theory import *  # noqa: F403
from widesparse.analysis.theory import __all__  # noqa: F401
