"""``python -m coordinator.cli``: the command line."""

import sys

from coordinator.cli._main import main

sys.exit(main())
