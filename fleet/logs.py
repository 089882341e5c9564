"""structlog set-up: JSON lines with a timestamp and level, to stderr or to a file under the fleet home."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TextIO

import structlog


def configure(stream: TextIO | None = None, path: Path | None = None, level: str = "info") -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        stream = path.open("a", buffering=1)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
