"""`python -m app ...`: the same as the `lightvlm` command (e.g. `python -m app serve`)."""

import sys

from app.cli import main

sys.exit(main())
