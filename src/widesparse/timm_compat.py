"""Compatibility path: the timm integration lives in :mod:`widesparse.integrations.timm`.

``python -m widesparse.timm_compat PATH/TO/timm/train.py --model widesparse_<name> ...`` keeps working.
"""

import sys

from widesparse.integrations.timm import *  # noqa: F403
from widesparse.integrations.timm import main

if __name__ == "__main__":
    sys.exit(main())
