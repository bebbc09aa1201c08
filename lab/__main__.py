"""`python -m lab ...` from a checkout: the lab's command line (lab/cli.py)."""

import sys

from lab.cli import main

sys.exit(main())
