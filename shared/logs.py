"""Logging: plain lines for a terminal, JSON lines for machines (``CREDITWATCH_LOG_JSON``).

Records may carry ``event_id``, ``check_id`` and ``customer_id`` (``extra=``); the JSON
form keeps them as fields so a log search can follow one event or one customer. Control
characters never reach the output raw, in either form: a message quoting a caller's value (a
path, an id) could otherwise forge log lines, drive a terminal or cut a line at a NUL.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

CONTEXT_FIELDS = (
    "service",
    "event_id",
    "check_id",
    "customer_id",
    "topic",
    "partition",
    "offset",
    "reason",
)


# C0 controls, DEL and C1 controls, each written as Python writes it in a string literal.
_ESCAPES = {
    code: {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}.get(code, f"\\x{code:02x}")
    for code in (*range(0x20), *range(0x7F, 0xA0))
}
# In a traceback the line breaks are the traceback's own; anything else is escaped.
_ESCAPES_BUT_NEWLINES = {code: text for code, text in _ESCAPES.items() if code != 0x0A}


def escape_controls(text: str) -> str:
    """``text`` with every control character escaped (``\\x00``, ``\\n``, ``\\x1b``)."""
    return text.translate(_ESCAPES)


class PlainLines(logging.Formatter):
    """Lines for a terminal: the message with its control characters escaped, so that one
    record is one line; a traceback keeps its own line breaks and nothing else."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_controls(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        return super().formatException(ei).translate(_ESCAPES_BUT_NEWLINES)

    def formatStack(self, stack_info: str) -> str:
        return super().formatStack(stack_info).translate(_ESCAPES_BUT_NEWLINES)


class JsonLines(logging.Formatter):
    """One JSON object a line; ``json.dumps`` escapes every control character itself."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat().replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(level: str = "INFO", *, json_lines: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonLines()
        if json_lines
        else PlainLines("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiokafka is chatty about rebalances and retries at INFO.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, root.level))
