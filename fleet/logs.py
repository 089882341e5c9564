"""structlog set-up: JSON lines with a timestamp and level, to stderr or to a file under the fleet home."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TextIO

import structlog


class _TlsEofNoise(logging.Filter):
    """asyncio warns at every TLS connection's close that nats-py's protocol answers EOF with True,
    which has no effect under TLS; on a cluster that is a line per reconnect, and says nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received() has no effect when using ssl" not in record.getMessage()


TLS_EOF_NOISE = _TlsEofNoise()


def configure(stream: TextIO | None = None, path: Path | None = None, level: str = "info") -> None:
    logging.getLogger("asyncio").addFilter(TLS_EOF_NOISE)  # once: the same filter is not added twice
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
