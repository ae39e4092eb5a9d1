"""The state documents a played golden stream left, held to pydantic's codec.

``shared.projection.StateCodec`` writes and reads the services' state documents with
msgspec; documents already stored were written by pydantic's ``TypeAdapter`` of the same
dataclasses. Every document of the three services must read back to the value pydantic
reads, and be written again byte for byte as pydantic writes it."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter
from sqlalchemy import select

from services.alerts import domain as alerts_domain
from services.alerts import store as alerts_store
from services.assessment import domain as assessment_domain
from services.assessment import store as assessment_store
from services.limits import domain as limits_domain
from services.limits import store as limits_store
from shared.db import make_engine
from shared.projection import StateCodec

STATES: dict[str, tuple[Any, type[Any]]] = {
    "limits": (limits_store.customers, limits_domain.CustomerState),
    "assessment": (assessment_store.customers, assessment_domain.CustomerState),
    "alerts": (alerts_store.customers, alerts_domain.CustomerState),
}


async def documents_agree(url_template: str) -> int:
    """Check every stored document (``url_template``: ``{service}`` per database); returns
    how many were checked."""
    checked = 0
    for service, (table, state_type) in STATES.items():
        adapter: TypeAdapter[Any] = TypeAdapter(state_type)
        codec: StateCodec[Any] = StateCodec(state_type)
        engine = make_engine(url_template.replace("{service}", service))
        try:
            async with engine.connect() as conn:
                documents = [r[0] for r in await conn.execute(select(table.c.state))]
        finally:
            await engine.dispose()
        assert documents, f"{service}: no state documents"
        for document in documents:
            value = adapter.validate_json(document)
            assert codec.load(document) == value, (service, document[:300])
            assert codec.dump(value) == adapter.dump_json(value).decode() == document, service
            checked += 1
    return checked
