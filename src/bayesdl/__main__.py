"""``python -m bayesdl``: the command-line tool."""

import sys

from bayesdl.cli import main

sys.exit(main())
