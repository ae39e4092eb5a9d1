"""/docs and /redoc render offline (issue 21: "/docs is blank offline; Swagger UI loads from a
CDN"): Debian's chromium, driven by Playwright, opens each page of the limits service (served
as a process on the real PostgreSQL) with every request that leaves the service blocked, and
the page shows the operations; nothing was asked of any other host."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, Page, Route, sync_playwright

from harness import processes, servers
from shared.openapi_documents import path_of

pytestmark = pytest.mark.integration

SUMMARY = "May this order go out on credit?"  # POST /v1/credit-checks


def _chromium() -> str:
    """Debian's chromium (installed like the harness installs PostgreSQL when it is missing):
    Playwright's own browser builds are downloads this project does not depend on."""
    found = shutil.which("chromium")
    if found is None:
        servers._apt_install(["chromium", "fonts-noto-cjk"])
        found = shutil.which("chromium")
    assert found is not None, "Debian's chromium package did not install a chromium"
    return found


@pytest.fixture(scope="module")
def service(postgres_server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = servers.create_database(postgres_server_url)
    env = processes.service_env(database_url=url, bootstrap="127.0.0.1:9")
    proc = processes.ServiceProcess(
        "limits", env, tmp_path_factory.mktemp("docs"), "--no-consume", "--no-relay"
    ).start()
    try:
        proc.wait_ready()
        yield proc.url
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=_chromium(),
            headless=True,
            args=["--no-sandbox", "--disable-background-networking"],
        )
        yield launched
        launched.close()


def _offline_page(browser: Browser, origin: str) -> tuple[Page, list[str], list[str]]:
    """A page that can reach only ``origin``: every other request is aborted and listed."""
    context = browser.new_context()
    elsewhere: list[str] = []
    failed: list[str] = []
    host = urlsplit(origin).netloc

    def only_the_service(route: Route) -> None:
        url = route.request.url
        if urlsplit(url).scheme in ("data", "blob") or urlsplit(url).netloc == host:
            route.continue_()
        else:
            elsewhere.append(url)
            route.abort()

    context.route("**/*", only_the_service)
    page = context.new_page()
    page.on(
        "requestfailed",
        lambda request: failed.append(request.url) if host in request.url else None,
    )
    page.on(
        "response",
        lambda response: (
            failed.append(f"{response.status} {response.url}") if response.status >= 400 else None
        ),
    )
    return page, elsewhere, failed


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_given_no_network_when_a_docs_page_is_opened_then_it_shows_the_operations(
    path: str, service: str, browser: Browser, tmp_path: Path
) -> None:
    # Given a browser that can reach nothing but the service
    page, elsewhere, failed = _offline_page(browser, service)
    # When the page is opened
    page.goto(service + path, wait_until="load")
    # Then it shows the operations, the credit check's among them, under their resources
    page.get_by_text(SUMMARY).first.wait_for(state="attached", timeout=30_000)
    page.get_by_text("limit requests").first.wait_for(state="visible", timeout=30_000)
    page.screenshot(path=str(tmp_path / "page.png"), full_page=False)
    if path == "/docs":
        # Swagger UI: one block per operation of the document
        document = json.loads(path_of("limits").read_text(encoding="utf-8"))
        expected = sum(len(item) for item in document["paths"].values())
        assert page.locator(".opblock").count() == expected
    # And it asked nothing of any other host, and everything it asked for was there
    assert elsewhere == []
    assert failed == []
