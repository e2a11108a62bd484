"""``python -m edge_sdk.cli``: the command line."""

import sys

from edge_sdk.cli._main import main

sys.exit(main())
