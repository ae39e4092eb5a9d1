"""Golden streams: every service's published events and API answers stay what they were.

Each golden stream (``streams.py``) is played through the three services in-process on
SQLite files in a temporary folder (``runner.py``) and what they published and answered is
compared with the files committed under ``data/<seed>/``. A difference fails the test with a
readable account per file and customer, unless ``allowed_differences.yaml`` allows it with a
reason. The committed files change only through ``scripts/golden``, and only once a change
of outputs has been reviewed.

The same stream on PostgreSQL must show the same (``integration``: it uses the server).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import servers
from tests.golden import codec, files, runner
from tests.golden import streams as st


def _sqlite(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path}/{{service}}.db"


def _judge(seed: int, actual: dict[str, object], manifest_fingerprint: str) -> None:
    expected, manifest = files.read(files.DATA / str(seed))
    assert manifest["fingerprint"] == manifest_fingerprint, (
        f"seed {seed}: the stream is not the one the golden files were made from "
        "(tests/golden/streams.py changed); regenerate them with scripts/golden once the "
        "change of outputs has been reviewed"
    )
    bad, allowed = files.split(files.differences(seed, expected, actual), files.load_allowed())
    if allowed:
        print(f"seed {seed}: {len(allowed)} allowed differences")
        for why in sorted({entry.why for _, entry in allowed}):
            print(f"  allowed: {why}")
    assert not bad, files.report(bad)


@pytest.mark.parametrize("seed", list(st.SEEDS))
async def test_given_a_golden_stream_when_played_through_the_services_then_they_publish_and_answer_as_recorded(
    seed: int, tmp_path: Path
) -> None:
    stream = st.generate(seed)
    actual, manifest = await runner.golden(stream, _sqlite(tmp_path))
    _judge(seed, actual, manifest["fingerprint"])
    # The state documents it left: msgspec's codec reads and writes what pydantic's did.
    assert await codec.documents_agree(_sqlite(tmp_path)) > 30


@pytest.mark.integration
async def test_given_the_first_golden_stream_when_played_on_postgresql_then_it_shows_what_sqlite_showed(
    postgres_server_url: str,
) -> None:
    seed = next(iter(st.SEEDS))
    stream = st.generate(seed)
    url = servers.create_database(postgres_server_url)
    actual, manifest = await runner.golden(stream, url)
    _judge(seed, actual, manifest["fingerprint"])
    assert await codec.documents_agree(url) > 30


def test_given_the_golden_streams_when_generated_then_every_hard_case_is_in_each() -> None:
    for stream in st.streams():
        missing = sorted(set(st.HARD_CASES) - set(stream.cases))
        assert not missing, f"seed {stream.seed} lacks {missing}"
        assert st.fingerprint(stream) == st.fingerprint(st.generate(stream.seed))


def test_given_the_allow_list_when_read_then_every_entry_says_what_and_why() -> None:
    # Malformed entries would silently allow nothing (or everything): they are errors.
    files.load_allowed()


def test_given_two_runs_that_differ_when_compared_then_each_difference_is_named_and_allowed_only_with_a_reason(
    tmp_path: Path,
) -> None:
    expected = {
        "events/limits.json": {
            "C-1": [{"id": "a", "data": {"open": "1.00"}}, {"id": "b", "data": {"open": "2.00"}}],
            "C-2": [{"id": "c"}],
        }
    }
    actual = {
        "events/limits.json": {
            "C-1": [
                {"id": "a", "data": {"open": "1.00"}},
                {"id": "x"},
                {"id": "b", "data": {"open": "2.50"}},
            ],
            "C-2": [{"id": "c"}],
        }
    }
    found = files.differences(11, expected, actual)
    assert [(d.customer, d.path) for d in found] == [("C-1", "[+1]"), ("C-1", "[1].data.open")]
    allow = tmp_path / "allowed.yaml"
    allow.write_text(
        "allowed:\n"
        "  - {seed: 11, file: events/limits.json, customer: C-1, path: '[*].data.open',"
        " why: the rule}\n"
    )
    bad, ok = files.split(found, files.load_allowed(allow))
    assert [d.path for d in bad] == ["[+1]"] and [d.path for d, _ in ok] == ["[1].data.open"]
    allow.write_text("allowed:\n  - {seed: 11, file: x, customer: y, path: z}\n")
    with pytest.raises(ValueError, match="lacks why"):
        files.load_allowed(allow)
    assert "C-1: 2" in files.report(found)
