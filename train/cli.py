"""`python -m train.cli`: the old spelling of `harken`, kept working. The command lives in the
runtime (monitor/cli.py); train's sub-commands plug in from train/commands.py."""

from __future__ import annotations

import sys

from monitor.cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
