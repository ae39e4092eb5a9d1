"""The OpenAPI documents committed in docs/openapi/ (the published contract): what each
service's app generates with the packaged default policy.

``python -m shared.openapi_documents`` writes them; tests/unit/test_openapi.py fails while
they differ from what the apps generate, so the committed contract is always current.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

from shared.auth import Principal, TokenRegistry
from shared.policy import load_policy
from shared.settings import Settings

SERVICES = ("assessment", "limits", "alerts")
DIRECTORY = Path(__file__).resolve().parents[1] / "docs" / "openapi"


def generate(service: str) -> dict[str, Any]:
    """``service``'s document, from an app that is built but never started (no database is
    opened: the URL is only parsed)."""
    build = importlib.import_module(f"services.{service}.app").build
    tokens = TokenRegistry({"unused": Principal("documents", frozenset())})
    # Whatever the environment says: the packaged policy (its grades are in the document).
    settings = Settings(database_url="sqlite+aiosqlite:///:memory:", policy=None)
    app, _host = build(
        settings, tokens=tokens, policy=load_policy(None), consume=False, relay=False
    )
    document: dict[str, Any] = app.openapi()
    return document


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def path_of(service: str) -> Path:
    return DIRECTORY / f"{service}.json"


def main() -> int:
    DIRECTORY.mkdir(parents=True, exist_ok=True)
    for service in SERVICES:
        path_of(service).write_text(render(generate(service)), encoding="utf-8")
        print(f"wrote {path_of(service)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
