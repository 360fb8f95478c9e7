"""Structured JSON logs: one object per line on stderr, with trace and span ids.

The event loop never writes to stderr itself: records go through a queue to a writer thread, so
a slow or full log pipe cannot stall Checks. Trace context is captured when the record is made
(in the loop's thread), where the current span is known. Nothing per request is logged at INFO.
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
import sys
import time
from typing import Any

from opentelemetry import trace

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class TraceContextFilter(logging.Filter):
    """Adds trace_id and span_id of the current span (if any) to each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            record.trace_id = f"{ctx.trace_id:032x}"
            record.span_id = f"{ctx.span_id:016x}"
        return True


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: time, level, logger, message and any extras."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


_listeners: list[logging.handlers.QueueListener] = []


def setup_logging(level: str) -> None:
    """Route every logger, through a queue and a writer thread, to JSON lines on stderr."""
    writer = logging.StreamHandler(sys.stderr)
    writer.setFormatter(JsonFormatter())
    records: queue.Queue[logging.LogRecord] = queue.Queue(-1)
    handler = logging.handlers.QueueHandler(records)
    handler.addFilter(TraceContextFilter())
    listener = logging.handlers.QueueListener(records, writer, respect_handler_level=False)
    listener.start()
    _listeners.append(listener)
    atexit.register(flush_logs)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def flush_logs() -> None:
    """Write every queued record and stop the writer thread; for a process that ends with
    ``os._exit`` (a forked worker), which skips ``atexit``."""
    while _listeners:
        _listeners.pop().stop()  # one inherited through fork has no thread here: a no-op
