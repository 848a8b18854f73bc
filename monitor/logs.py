"""structlog set-up: JSON lines when stdout is not a TTY, a console renderer otherwise.

Third-party stdlib loggers (paho, transformers) are routed through the same processors.
"""

from __future__ import annotations

import logging
import sys

import structlog

_configured = False


def configure_logging(level: str = "info", *, json: bool | None = None, stream=None) -> None:
    """Idempotent; call once at program start. `stream` defaults to stderr."""
    global _configured
    stream = stream or sys.stderr
    use_json = (not stream.isatty()) if json is None else json
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_harken", False):
            root.removeHandler(old)
    handler._harken = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Chatty libraries stay at warning unless we are debugging.
    for name in ("matplotlib", "PIL", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    _configured = True


def get_logger(**binds):
    if not _configured:
        configure_logging()
    return structlog.get_logger("harken").bind(**binds)
