"""The Alembic history of each service builds exactly the tables its code declares."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from tests.databases import fresh_engine

pytestmark = pytest.mark.integration
SERVICES = ["assessment", "limits", "alerts"]
# Fields of the limits state document added after limits_0003 (the service's own documents
# have them; older ones read them as their defaults).


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
@pytest.mark.parametrize("service", SERVICES)
async def test_migrations_produce_the_declared_schema(kind, service, tmp_path: Path, request):
    pg = request.getfixturevalue("postgres_server_url") if kind == "postgresql" else None
    engine = await fresh_engine(kind, service, tmp_path=tmp_path, pg_server_url=pg)
    metadata = importlib.import_module(f"services.{service}.store").metadata

    def diff(sync_conn):
        ctx = MigrationContext.configure(
            sync_conn,
            opts={
                "compare_type": True,
                "include_name": lambda name, kind, _parent: (
                    not (kind == "table" and name.startswith("alembic_version"))
                ),
            },
        )
        return compare_metadata(ctx, metadata)

    async with engine.connect() as conn:
        differences = await conn.run_sync(diff)
    await engine.dispose()
    assert differences == []


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_limits_0003_moves_live_reservations_out_of_the_documents_and_back(
    kind, tmp_path: Path, request
):
    """Stored before limits_0003: every reservation in the customer's document. After it: the
    live ones are rows, the ended ones gone, the document holds neither; the state the
    service reads is the same. Downgrading puts the live ones back."""
    from datetime import UTC, datetime

    from sqlalchemy import text

    from services.limits import store
    from services.schema import downgrade, upgrade
    from shared.db import make_engine
    from tests.databases import fresh_url

    pg = request.getfixturevalue("postgres_server_url") if kind == "postgresql" else None
    engine = make_engine(fresh_url(kind, tmp_path=tmp_path, pg_server_url=pg, name="m3"))
    await upgrade(engine, "limits", "limits_0002")
    document = (
        '{"customer_id":"C-1","currency":"EUR","name":"Ünïcode GmbH","registered":true,'
        '"payment_terms_days":30,"parent_id":null,"invoices":{},"credits":{},"dunning":{},'
        '"reservations":{"SO-1":{"order_id":"SO-1","check_id":"k1","amount":"1250.50",'
        '"expires_at":"2026-03-04T09:00:00Z","status":"active"},'
        '"SO-2":{"order_id":"SO-2","check_id":"k2","amount":"10.00",'
        '"expires_at":"2026-03-04T09:00:00Z","status":"released"},'
        '"SO-3":{"order_id":"SO-3","check_id":"k3","amount":"7.00",'
        '"expires_at":"2026-03-02T09:00:00Z","status":"expired"}},'
        '"requests":{},"grade":"BBB","manual":null,"limit_lapsed":false,"hold":null,'
        '"open_alerts":{},"as_of":"2026-03-01","last_time":"2026-03-01T09:00:00Z"}'
    )
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO limits_customers (customer_id, group_id, currency, limit_amount, "
                "limit_source, on_hold, open_receivables, overdue_amount, max_days_overdue, "
                "reserved, exposure, available, over_limit, open_alerts, as_of, last_seq, state) "
                "VALUES ('C-1', 'C-1', 'EUR', :z, 'policy', false, :z, :z, 0, :z, :z, :z, false, "
                "0, :t, 7, :doc)"
            ),
            {
                "z": "0" if kind == "sqlite" else 0,
                "doc": document,
                "t": "2026-03-01 09:00:00"
                if kind == "sqlite"
                else datetime(2026, 3, 1, 9, tzinfo=UTC),
            },
        )

    # To the last layout of whole-history documents (limits_0007 changes the layout and has
    # `creditwatch db upgrade` rebuild the projections from the event store instead).
    await upgrade(engine, "limits", "limits_0006")
    async with engine.connect() as conn:
        rows = (await conn.execute(store.reservations.select())).all()
        stored = (
            await conn.execute(text("SELECT state FROM limits_customers WHERE customer_id = 'C-1'"))
        ).scalar_one()
    assert [(r.order_id, r.check_id, str(r.amount)) for r in rows] == [("SO-1", "k1", "1250.50")]
    document_after = json.loads(stored)
    assert "reservations" not in document_after or document_after["reservations"] == {}
    assert document_after["name"] == "Ünïcode GmbH" and document_after["grade"] == "BBB"

    await downgrade(engine, "limits", "limits_0002")
    async with engine.connect() as conn:
        back = (
            await conn.execute(text("SELECT state FROM limits_customers WHERE customer_id = 'C-1'"))
        ).scalar_one()
    await engine.dispose()
    assert (
        '"SO-1":{"order_id":"SO-1","check_id":"k1","amount":"1250.50",'
        '"expires_at":"2026-03-04T09:00:00Z","status":"active"}' in back
    )
    assert '"SO-2"' not in back and '"last_time":"2026-03-01T09:00:00Z"' in back
