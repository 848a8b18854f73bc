"""harken training side: builds model artifacts from normal-only recordings. Imports `monitor`."""
