"""Logging: plain lines for a terminal, JSON lines for machines (``CREDITWATCH_LOG_JSON``).

Records may carry ``event_id``, ``check_id`` and ``customer_id`` (``extra=``); the JSON
form keeps them as fields so a log search can follow one event or one customer.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

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


class JsonLines(logging.Formatter):
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
        else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiokafka is chatty about rebalances and retries at INFO.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, root.level))
