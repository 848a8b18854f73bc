"""`python -m monitor`: the `harken` command (monitor/cli.py)."""

import sys

from monitor.cli import main

sys.exit(main())
