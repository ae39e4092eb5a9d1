"""The services' HTTP server settings."""

from __future__ import annotations

from fastapi import FastAPI

from shared.settings import Settings
from tools.cli import server_config


def test_idle_connections_outlive_those_of_the_usual_clients() -> None:
    """uvicorn closes an idle connection after 5 s by default; a client reusing it at that
    moment gets a reset, retried for a GET but not for a credit check (a POST). Go's clients
    keep idle connections 90 s, load balancers usually 60 s."""
    config = server_config(FastAPI(), Settings(), host="127.0.0.1", port=1, graceful_s=5)
    assert config.timeout_keep_alive == 120 > 90
    assert (config.access_log, config.timeout_graceful_shutdown) == (False, 5)


def test_the_keep_alive_is_a_setting() -> None:
    config = server_config(
        FastAPI(), Settings(http_keep_alive_s=30), host="127.0.0.1", port=1, graceful_s=5
    )
    assert config.timeout_keep_alive == 30
