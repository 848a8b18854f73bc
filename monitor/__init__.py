"""harken runtime: audio front end, models, scorers and the monitoring daemon."""

__version__ = "0.1.0"
