"""harken runtime: audio front end, models, scorers, the monitoring daemon and the `harken`
command (monitor/cli.py)."""

__version__ = "0.1.0"
