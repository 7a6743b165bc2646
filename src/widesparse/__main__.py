import sys

from widesparse.cli import main

sys.exit(main())
