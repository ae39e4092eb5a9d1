"""The statements a batch of credit checks runs look every row up by its key, whatever the
planner believes of the tables (PostgreSQL).

A fresh, never analysed database is the worst case: the planner takes every table for empty,
and a plan made then is what a prepared statement may keep long after the tables have
grown. Seen in a benchmark: the reservations of the customers whose state had to be read were
hash-joined against a sequential scan of every reservation (20,000 rows per batch, and
growing), because the lateral lookup had been flattened into a join.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.limits import checks
from tests.databases import fresh_engine

pytestmark = pytest.mark.integration

STATEMENTS = {
    "READ_SQL": (checks.READ_SQL, (["C1", "C2"], ["C1"], [7], ["O1", "O2"], 2)),
    "LOCK_SQL": (checks.LOCK_SQL, (["C1", "C2"], ["C1"], [7])),
    "LOCK_MORE_SQL": (checks.LOCK_MORE_SQL, (["P1"], [], [])),
    "CONTEXT_SQL": (checks.CONTEXT_SQL, (["O1", "O2"], ["C1", "P1"], 2, ["C1", "C2"])),
}


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def _literal(value: Any) -> str:
    if isinstance(value, list):  # the statement's parameter casts say which type
        return "'{" + ",".join(str(v) for v in value) + "}'"
    return str(value)


@pytest.mark.parametrize("generic", [False, True], ids=["custom plan", "generic plan"])
@pytest.mark.parametrize("name", sorted(STATEMENTS))
async def test_given_tables_the_planner_takes_for_empty_then_every_table_is_read_by_key(
    name: str, generic: bool, tmp_path: Path, postgres_server_url: str
) -> None:
    """Both the plan made for the values at hand and the one made once without them, which
    the batches' connection keeps (``plan_cache_mode = force_generic_plan``)."""
    sql, args = STATEMENTS[name]
    engine = await fresh_engine(
        "postgresql", "limits", tmp_path=tmp_path, pg_server_url=postgres_server_url
    )
    try:
        async with engine.connect() as conn:
            raw: Any = (await conn.get_raw_connection()).driver_connection
            if generic:
                await raw.execute("SET plan_cache_mode = force_generic_plan")
                await raw.execute(f"PREPARE batch_statement AS {sql}")
                values = ", ".join(_literal(a) for a in args)
                found = await raw.fetchval(
                    f"EXPLAIN (FORMAT JSON) EXECUTE batch_statement({values})"
                )
            else:
                found = await raw.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *args)
    finally:
        await engine.dispose()
    plan = (json.loads(found) if isinstance(found, str) else found)[0]["Plan"]
    scans = [
        (node["Node Type"], node["Relation Name"])
        for node in _nodes(plan)
        if "Relation Name" in node
    ]
    assert scans, plan
    whole = [table for kind, table in scans if kind == "Seq Scan"]
    assert not whole, f"{name} scans {whole} whole: {scans}"
