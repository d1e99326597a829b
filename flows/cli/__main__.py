"""``python -m flows.cli``: the `hierloc` command line."""

import sys

from flows.cli.main import main

sys.exit(main())
