"""The line-side monitoring daemon: sources -> ring buffers -> inference -> alarms -> publishers."""
