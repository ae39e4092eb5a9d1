"""The one ``creditwatch`` command: dev, serve, db upgrade, replay, verify, simulate,
import open-items, backtest."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import signal
import sys
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import uvicorn
from uvicorn.loops.auto import auto_loop_factory

from shared.auth import TokenRegistry
from shared.runtime import tune_gc
from shared.settings import ConfigError, Settings, load_settings
from tools import devbroker, registry

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="creditwatch: event-sourced customer-credit monitoring.",
)
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
        typer.secho(
            f"unknown service {name!r}; choose one of {', '.join(registry.SERVICES)}",
            fg="red",
            err=True,
        )
        raise typer.Exit(2)
    return name


def main() -> None:
    app()


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"creditwatch {importlib.metadata.version('creditwatch')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit"
        ),
    ] = False,
) -> None:
    pass


# ---- serve ------------------------------------------------------------------------------------


@app.command()
def serve(
    service: ServiceName,
    host: Annotated[str | None, typer.Option(help="Bind address (default: settings)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: the service's)")] = None,
    consume: Annotated[
        bool,
        typer.Option(
            help="Run the Kafka consumer and scheduler; --no-consume for API-only replicas"
        ),
    ] = True,
    relay: Annotated[
        bool,
        typer.Option(
            help="Publish the service's outbox to Kafka when no "
            "other process of it does; --no-relay for API "
            "replicas beside a process that relays"
        ),
    ] = True,
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
        else:
            from services.schema import pending

            current, head = pending(settings.database_url_for(name), name)
            if current != head:
                raise ConfigError(
                    f"its database is at revision {current or 'none'}, this version needs "
                    f"{head}: run `creditwatch db upgrade` first (it rebuilds projections "
                    "whose layout changed)"
                )
        fastapi_app, _host = registry.build(
            name, settings, tokens=tokens, consume=consume, relay=relay
        )
    except ConfigError as exc:
        typer.secho(f"{name}: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    tune_gc()
    config = server_config(
        fastapi_app,
        settings,
        host=host or settings.host,
        port=port or settings.port_for(name),
        graceful_s=20,
    )
    _run_on_server_loop(_serve_until_signalled([_Server(config)]))


def server_config(
    app: Any, settings: Settings, *, host: str, port: int, graceful_s: int
) -> uvicorn.Config:
    """A service's HTTP server. Idle keep-alive connections are kept
    ``CREDITWATCH_HTTP_KEEP_ALIVE_S`` (uvicorn's default is 5 s): a client that reuses a
    connection just as the server closes it gets a reset, which clients retry for a GET but
    not for a POST such as a credit check (seen: 4 of 15,000 checks at 1,000/s failed so).
    Clients and load balancers in front should close idle connections sooner than this."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=graceful_s,
        timeout_keep_alive=settings.http_keep_alive_s,
    )


def _run_on_server_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on the event loop ``uvicorn`` itself would choose (``--loop auto``:
    uvloop where it is installed, as it is with ``uvicorn[standard]``), so that a service
    runs as fast as the same app under plain ``uvicorn`` would."""
    loop_factory = auto_loop_factory(use_subprocess=False)
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main)


async def _serve_until_signalled(servers: list[_Server]) -> None:
    """Run the servers until SIGTERM or SIGINT, then stop them gracefully: finish the
    requests and the batch in hand, commit, leave the consumer group — and exit 0."""
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for server in servers:
            server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    await asyncio.gather(*(server.serve() for server in servers))


def _default_jobs() -> int:
    from shared.parallel import default_jobs

    return default_jobs()


JOBS_HELP = (
    "Processes folding at once, each a share of the customers (PostgreSQL; SQLite folds in "
    "one). Default: the cores this process may use (its CPU affinity and a container's CPU "
    "limit), at most 8."
)


# ---- db -----------------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(
    jobs: Annotated[int | None, typer.Option(min=1, max=64, help=JOBS_HELP)] = None,
) -> None:
    """Apply the Alembic migrations to every service's database (and rebuild what a
    migration's new layout needs, with --jobs processes)."""
    settings = _settings()
    _setup_logging(settings)
    done = registry.upgrade(settings, list(registry.SERVICES), jobs=jobs or _default_jobs())
    for url in done:
        typer.echo(f"upgraded {url}")


# ---- replay / verify ------------------------------------------------------------------------


@app.command()
def replay(
    service: ServiceName,
    jobs: Annotated[int | None, typer.Option(min=1, max=64, help=JOBS_HELP)] = None,
) -> None:
    """Rebuild a service's projections from its event store."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    name = _check_service(service)
    settings = _settings()
    _setup_logging(settings)

    tune_gc()  # as a service runs: the replay collects its garbage once per window

    async def run() -> int:
        core, engine = registry.core_for(name, settings)
        try:
            with Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
            ) as progress:
                task = progress.add_task(f"replaying {name}", total=None)

                def step(done: int, total: int) -> None:
                    progress.update(task, completed=done, total=total)

                return await core.replay(step, jobs=jobs or _default_jobs())
        finally:
            await engine.dispose()

    count = asyncio.run(run())
    typer.echo(f"{name}: replayed {count} events")


@app.command()
def verify(
    service: ServiceName,
    jobs: Annotated[int | None, typer.Option(min=1, max=64, help=JOBS_HELP)] = None,
) -> None:
    """Compare a service's projections with a replay of its event store (read-only)."""
    name = _check_service(service)
    settings = _settings()
    _setup_logging(settings)

    tune_gc()

    async def run() -> list[str]:
        core, engine = registry.core_for(name, settings)
        try:
            return await core.verify(jobs=jobs or _default_jobs())
        finally:
            await engine.dispose()

    diffs = asyncio.run(run())
    if diffs:
        for line in diffs[:50]:
            typer.echo(line)
        typer.secho(
            f"{name}: {len(diffs)} differences between projections and replay", fg="red", err=True
        )
        raise typer.Exit(1)
    typer.echo(f"{name}: projections match a replay of the event store")


# ---- offsets ----------------------------------------------------------------------------------

offsets_app = typer.Typer(
    no_args_is_help=True,
    help="The consumer positions a service stores (in its database, not in Kafka).",
)
app.add_typer(offsets_app, name="offsets")


async def _broker_view(
    settings: Settings, topics: list[str]
) -> tuple[str | None, dict[tuple[str, int], tuple[int, int]]]:
    """The broker's cluster id and (beginning, end) offsets of every partition of ``topics``."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.structs import TopicPartition

    kwargs = settings.kafka_client_kwargs()
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, **kwargs)
    await asyncio.wait_for(admin.start(), 15)
    try:
        cluster = (await admin.describe_cluster()).get("cluster_id")
        described = await admin.describe_topics(topics) if topics else []
    finally:
        await admin.close()
    tps = [
        TopicPartition(t["topic"], p["partition"])
        for t in described
        if not t.get("error_code")
        for p in sorted(t["partitions"], key=lambda p: p["partition"])
    ]
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, **kwargs)
    await asyncio.wait_for(consumer.start(), 15)
    try:
        begins = await consumer.beginning_offsets(tps) if tps else {}
        ends = await consumer.end_offsets(tps) if tps else {}
    finally:
        await consumer.stop()
    return cluster, {(tp.topic, tp.partition): (begins[tp], ends[tp]) for tp in tps}


@offsets_app.command("show")
def offsets_show(service: ServiceName) -> None:
    """Each input partition: the position stored, the cluster it is in, and the broker's log."""
    from shared import eventstore as es

    name = _check_service(service)
    settings = _settings()
    _setup_logging(settings)

    async def run() -> tuple[list[Any], str | None, dict[tuple[str, int], tuple[int, int]]]:
        core, engine = registry.core_for(name, settings)
        try:
            async with engine.connect() as conn:
                stored = await es.all_offsets(conn, core.service.core)
        finally:
            await engine.dispose()
        cluster, logs = await _broker_view(settings, core.service.input_topics())
        return stored, cluster, logs

    try:
        stored, cluster, logs = asyncio.run(run())
    except Exception as exc:
        typer.secho(f"offsets: {type(exc).__name__}: {exc}", fg="red", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"broker {settings.kafka_bootstrap}: cluster {cluster}")
    known = {(r.topic, r.partition): r for r in stored}
    for key in sorted(set(known) | set(logs)):
        row = known.get(key)
        begin, end = logs.get(key, (None, None))
        position = row.next_offset if row is not None else None
        note = ""
        if row is not None and row.cluster_id not in (None, cluster):
            note = f"  ANOTHER LOG (stored for cluster {row.cluster_id})"
        elif position is not None and end is not None and position > end:
            note = "  PAST THE LOG'S END"
        elif position is not None and end is not None:
            note = f"  lag {end - position}"
        typer.echo(
            f"  {key[0]}/{key[1]}: stored {position if position is not None else '-'}"
            f"  log {begin if begin is not None else '-'}..{end if end is not None else '-'}"
            f"{note}"
        )


@offsets_app.command("reset")
def offsets_reset(
    service: ServiceName,
    to: Annotated[str, typer.Option(help="beginning | end (of each partition's log)")],
    topic: Annotated[str | None, typer.Option(help="Only this topic")] = None,
    partition: Annotated[int | None, typer.Option(help="Only this partition")] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do it (otherwise: show only)")] = False,
) -> None:
    """Move a service's stored positions, e.g. after its broker's log was made anew.

    Stop the service's consumers first (a running one stores its own positions over these).
    From the beginning, events the service already stored are recognised by id and not
    applied twice; to the end, what lies before it is skipped for good. The positions are
    recorded as the current broker's (its cluster id).
    """
    from shared import eventstore as es

    if to not in ("beginning", "end"):
        typer.secho("--to must be beginning or end", fg="red", err=True)
        raise typer.Exit(2)
    name = _check_service(service)
    settings = _settings()
    _setup_logging(settings)

    async def run() -> dict[tuple[str, int], int]:
        core, engine = registry.core_for(name, settings)
        try:
            topics = [t for t in core.service.input_topics() if topic in (None, t)]
            cluster, logs = await _broker_view(settings, topics)
            chosen = {
                key: (begin if to == "beginning" else end)
                for key, (begin, end) in logs.items()
                if partition in (None, key[1])
            }
            if yes and chosen:
                async with engine.begin() as conn:
                    await es.reset_offsets(conn, core.service.core, chosen, core.clock(), cluster)
            return chosen
        finally:
            await engine.dispose()

    try:
        chosen = asyncio.run(run())
    except Exception as exc:
        typer.secho(f"offsets: {type(exc).__name__}: {exc}", fg="red", err=True)
        raise typer.Exit(1) from None
    if not chosen:
        typer.secho("no partition matches", fg="red", err=True)
        raise typer.Exit(1)
    for (t, p), offset in sorted(chosen.items()):
        typer.echo(f"  {t}/{p} -> {offset}")
    if yes:
        typer.echo(f"{name}: {len(chosen)} position(s) set to the {to} of the broker's log")
    else:
        typer.echo("nothing changed: add --yes to store these positions")


# ---- simulate -------------------------------------------------------------------------------


@app.command()
def simulate(
    customers: Annotated[int, typer.Option(help="How many customers")] = 50,
    months: Annotated[int, typer.Option(help="Months of history")] = 12,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same history)")] = 7,
) -> None:
    """Publish a realistic synthetic history to the input topics."""
    from tools import simulate as sim

    settings = _settings()
    _setup_logging(settings)
    count = asyncio.run(sim.publish(settings, customers=customers, months=months, seed=seed))
    typer.echo(f"published {count} events for {customers} customers over {months} months")


# ---- import ---------------------------------------------------------------------------------

import_app = typer.Typer(no_args_is_help=True, help="Initial loads of existing data.")
app.add_typer(import_app, name="import")


_IMPORT_HELP = (
    "Initial load of an existing ledger: open invoices (and partial payments) as events."
    "\n\n"
    "Open items CSV (UTF-8, comma-separated, a header row, columns in any order): "
    "customer_id, invoice_id, amount, currency, issue_date, due_date (required); "
    'order_id, open_amount (optional). Amounts are plain decimals ("1250.00", no '
    "thousands separators) within the currency's minor units; currencies ISO 4217; dates "
    "YYYY-MM-DD. open_amount is what is still open of a partly paid invoice "
    "(0 <= open_amount <= amount); the paid part is published as a payment.received "
    "allocated to the invoice, dated on its issue date."
    "\n\n"
    "Customers CSV (--customers): customer_id, name, currency (required); country, "
    "industry, payment_terms_days, parent_id (optional); published as customer.registered "
    "first. Without it the customers must already be registered on crm.customers."
    "\n\n"
    "Every row is validated first with the consumers' own rules. Any fault is reported as "
    "'row N: <column>: <message>' (N counts data rows, header excluded), nothing is "
    "published and the exit code is 1. A file that cannot be read as a whole (not UTF-8, "
    "no header, missing or unknown columns, no data rows) exits with 2. Event ids are "
    "stable (import-invoice-<invoice_id>, import-payment-<invoice_id>, "
    "import-customer-<customer_id>) and keyed by customer id, so importing the same file "
    "twice is harmless."
)


@import_app.command("open-items", help=_IMPORT_HELP)
def import_open_items(
    file: Annotated[
        Path,
        typer.Argument(
            help="Open items CSV (UTF-8, comma-separated)",
            exists=True,
            dir_okay=False,
            readable=True,
        ),
    ],
    source: Annotated[
        str, typer.Option(help="CloudEvents source of the imported events; keep it for re-imports")
    ] = "/import/ledger",
    customers: Annotated[
        Path | None,
        typer.Option(
            help="Customers CSV to register first (customer.registered)",
            exists=True,
            dir_okay=False,
            readable=True,
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option(help="Validate and report only; publish nothing")
    ] = False,
) -> None:
    """Initial load of an existing ledger (help: _IMPORT_HELP)."""
    from shared.policy import PolicyError, load_policy
    from tools import importer

    settings = _settings()
    _setup_logging(settings)
    try:
        policy = load_policy(settings.policy)
    except PolicyError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(2) from None
    try:
        plan = importer.plan_import(
            file, settings=settings, customers_path=customers, source=source, policy=policy
        )
    except importer.ImportFileError as exc:
        typer.secho(f"import failed: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    if not plan.ok:
        for error in plan.errors:
            typer.echo(str(error), err=True)
        typer.secho(
            f"{len(plan.errors)} problem(s) in {file}; nothing was published", fg="red", err=True
        )
        raise typer.Exit(1)
    for line in importer.summary(plan):
        typer.echo(line)
    if dry_run:
        typer.echo(f"dry run: {len(plan.messages)} events validated; nothing published")
        return
    try:
        asyncio.run(importer.KafkaPublisher(settings).publish(plan.messages))
    except Exception as exc:
        typer.secho(
            f"publishing failed: {type(exc).__name__}: {exc}; run the same import "
            "again once the broker is reachable (ids are stable, so events already "
            "published are not counted twice)",
            fg="red",
            err=True,
        )
        raise typer.Exit(1) from None
    topics = sorted({m.topic for m in plan.messages})
    typer.echo(f"published {len(plan.messages)} events to {', '.join(topics)} (source {source})")


# ---- backtest -------------------------------------------------------------------------------


_BACKTEST_HELP = (
    "Replay history under a candidate policy and report what would have differed."
    "\n\n"
    "Each service's event store is read (never written) and folded twice into throw-away "
    "projections: under the current policy (CREDITWATCH_POLICY) and under the candidate. "
    "The grades each policy derives feed that policy's limits and alerts folds. Reported "
    "per customer: grade, limit, over-limit and hold, open alerts at the end of the window, "
    "alerts raised and limit changes within it, and the recorded credit checks within it "
    "judged again."
    "\n\n"
    "Events after --to are ignored; events before --from are folded to build the state, "
    "but only the window is reported. An invalid candidate policy lists its faults and "
    "exits with 2."
)


@app.command(help=_BACKTEST_HELP)
def backtest(
    policy: Annotated[
        Path,
        typer.Option(help="The candidate policy YAML", exists=True, dir_okay=False, readable=True),
    ],
    from_: Annotated[
        str | None,
        typer.Option("--from", help="Window start: YYYY-MM-DD or RFC 3339 (business time)"),
    ] = None,
    to: Annotated[
        str | None,
        typer.Option(
            help="Window end, inclusive: YYYY-MM-DD or RFC 3339; later events are ignored"
        ),
    ] = None,
    format_: Annotated[str, typer.Option("--format", help="text | json")] = "text",
) -> None:
    """Replay history under a candidate policy and report what would have differed."""
    from shared.policy import PolicyError, load_policy
    from tools import backtest as bt

    if format_ not in ("text", "json"):
        typer.secho("--format must be text or json", fg="red", err=True)
        raise typer.Exit(2)
    settings = _settings()
    _setup_logging(settings)
    try:
        candidate = load_policy(policy)
    except PolicyError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(2) from None
    try:
        current = load_policy(settings.policy)
    except PolicyError as exc:
        typer.secho(f"the current policy cannot be loaded: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    try:
        window = bt.make_window(from_, to)
        report = asyncio.run(
            bt.run_backtest(
                settings,
                current,
                candidate,
                window=window,
                progress=lambda message: typer.echo(message, err=True),
            )
        )
    except bt.BacktestError as exc:
        typer.secho(f"backtest: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    if format_ == "json":
        typer.echo(json.dumps(report, indent=2))
    else:
        typer.echo(bt.render_text(report))


# ---- dev ------------------------------------------------------------------------------------


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
    broker_port: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=65535,
            envvar=devbroker.BROKER_PORT_ENV,
            show_default=False,
            help=f"Port of the embedded broker on {devbroker.EMBEDDED_HOST} (default "
            f"{devbroker.DEFAULT_BROKER_PORT}); not used when CREDITWATCH_KAFKA_BOOTSTRAP "
            "names a broker",
        ),
    ] = None,
) -> None:
    """Everything on one machine: embedded broker, SQLite, all three services."""
    if demo and importlib.util.find_spec("httpx") is None:  # else the demo task dies unseen
        _refuse(
            devbroker.DevStartError(
                [
                    "--demo needs the HTTP client httpx, which comes with the dev extra "
                    "(scripts/setup, or pip install 'creditwatch[dev]')"
                ]
            )
        )
    os.environ.setdefault("CREDITWATCH_DEV_MODE", "true")
    settings = _settings(dev_mode=True)
    _setup_logging(settings)
    # Every check before anything starts or is deleted: a port in use is one line naming
    # what to set, not a banner followed by a traceback.
    try:
        broker = devbroker.plan(settings, broker_port=broker_port)
    except devbroker.DevStartError as exc:
        _refuse(exc)
    stores = _sqlite_stores(settings)
    if reset:
        folder = os.path.dirname(settings.database_url_for("x").split("///", 1)[-1])
        if folder and os.path.isdir(folder) and settings.database_url.startswith("sqlite"):
            shutil.rmtree(folder)
        stores = []
    tokens = TokenRegistry.from_settings(settings)
    if not broker.embedded:
        typer.echo(f"using the Kafka broker at {broker.bootstrap} (CREDITWATCH_KAFKA_BOOTSTRAP)")
        _run_on_server_loop(_dev(settings, tokens, demo=demo, demo_customers=demo_customers))
        return
    settings = _settings(dev_mode=True, kafka_bootstrap=broker.bootstrap)
    cluster_id = devbroker.new_cluster_id()
    port = int(broker.bootstrap.rpartition(":")[2])
    try:
        with devbroker.embedded_broker(port, cluster_id):
            typer.echo(
                f"embedded Kafka-compatible broker (Tansu, in memory) on {broker.bootstrap}, "
                f"cluster id {cluster_id}"
            )
            if stores:
                typer.echo(
                    "the embedded broker keeps nothing across restarts: its log starts empty; "
                    "the services' stores are kept (use --reset to start empty); consumers "
                    "read the new log from its start"
                )
            _run_on_server_loop(_dev(settings, tokens, demo=demo, demo_customers=demo_customers))
    except devbroker.DevStartError as exc:
        _refuse(exc)


def _refuse(problem: devbroker.DevStartError) -> NoReturn:
    for line in problem.lines:
        typer.secho(line, fg="red", err=True)
    raise typer.Exit(2)


def _sqlite_stores(settings: Settings) -> list[Path]:
    """The services' SQLite files that exist already (kept from an earlier run)."""
    found: list[Path] = []
    for name in registry.SERVICES:
        url = settings.database_url_for(name)
        if url.startswith("sqlite") and "///" in url:
            path = Path(url.split("///", 1)[1].split("?", 1)[0])
            if path.is_file() and path.stat().st_size > 0:
                found.append(path)
    return found


async def _dev(
    settings: Settings, tokens: TokenRegistry, *, demo: bool, demo_customers: int
) -> None:
    from tools import simulate as sim

    await asyncio.to_thread(registry.upgrade, settings, list(registry.SERVICES))
    await registry.create_topics(settings)
    tune_gc()
    servers: list[_Server] = []
    for name in registry.SERVICES:
        fastapi_app, _ = registry.build(name, settings, tokens=tokens)
        config = server_config(
            fastapi_app, settings, host=settings.host, port=settings.port_for(name), graceful_s=10
        )
        servers.append(_Server(config))
    serving = asyncio.create_task(_serve_until_signalled(servers))
    _print_banner(settings, tokens)
    demo_task = None
    if demo:
        token = next(iter(tokens.generated), None) or os.environ.get("CREDITWATCH_DEMO_TOKEN")
        demo_task = asyncio.create_task(
            sim.run_demo(
                settings, customers=demo_customers, token=token, stop=lambda: servers[0].should_exit
            )
        )
    with contextlib.suppress(Exception):
        await serving
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
