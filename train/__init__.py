"""harken training side: builds model artifacts from normal-only recordings. Imports `monitor`;
its `harken` sub-commands (train/commands.py) plug into the runtime's command."""
