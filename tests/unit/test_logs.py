"""JSON log lines carry the ids an operator searches by, and never a token."""

from __future__ import annotations

import io
import json
import logging

from shared.logs import JsonLines, configure


def test_a_json_line_carries_the_event_check_and_customer_ids() -> None:
    # Given the JSON formatter
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLines())
    log = logging.getLogger("creditwatch.test.logs")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    # When a record with context is logged
    log.info(
        "credit check %s: %s",
        "chk-1",
        "approved",
        extra={"check_id": "chk-1", "customer_id": "C-9", "event_id": "check-chk-1"},
    )
    log.removeHandler(handler)
    # Then the line is JSON with the message and the ids as fields
    line = json.loads(stream.getvalue())
    assert line["message"] == "credit check chk-1: approved"
    assert (line["check_id"], line["customer_id"], line["event_id"]) == (
        "chk-1",
        "C-9",
        "check-chk-1",
    )
    assert line["level"] == "info" and line["ts"].endswith("Z")


def test_configure_switches_the_root_logger_to_json_lines() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure("WARNING", json_lines=True)
        assert isinstance(root.handlers[0].formatter, JsonLines)
        assert root.level == logging.WARNING
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
