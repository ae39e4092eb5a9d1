"""The test harness's rule for which server temp dirs a sweep may delete (harness/servers.py).

Several harness runs share a machine; each sweeps the dirs that SIGKILLed runs left behind.
The rule must never pick a dir that a live run owns - whose server may have been restarted
and so no longer runs under the pid it started with - yet must still pick real leftovers.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from harness.servers import (
    DirFacts,
    OwnerRecord,
    ProcessIdentity,
    is_alive,
    process_identity,
    sweep_decision,
)
from harness.servers import _names_dir as names_dir
from harness.servers import _read_owner_record as read_owner_record

BOOT = "3f1c2a4e-boot"
HARNESS = ProcessIdentity(pid=4100, start_ticks=90_000)
FIRST_SERVER = ProcessIdentity(pid=4123, start_ticks=90_050)
RESTARTED_SERVER = ProcessIdentity(pid=4388, start_ticks=95_210)

RECORD = OwnerRecord(run_id="run-a", boot_id=BOOT, owner=HARNESS, servers=(RESTARTED_SERVER,))
NOTHING_ALIVE = DirFacts(
    lock_held=False,
    boot_id=BOOT,
    living=frozenset(),
    age_seconds=7200.0,
    pid_file_server_alive=False,
)


def test_given_a_live_run_whose_server_restarted_when_judged_then_its_dir_is_kept() -> None:
    # The old rule looked at the first server's pid only: dead after the restart.
    facts = replace(NOTHING_ALIVE, living=frozenset({HARNESS, RESTARTED_SERVER}))

    decision = sweep_decision(RECORD, facts)

    assert not decision.remove
    assert "run-a" in decision.reason


def test_given_a_run_mid_restart_when_judged_then_its_live_harness_alone_keeps_the_dir() -> None:
    stopped = replace(RECORD, servers=())
    facts = replace(NOTHING_ALIVE, living=frozenset({HARNESS}))

    assert not sweep_decision(stopped, facts).remove


def test_given_the_owner_lock_is_held_when_judged_then_the_dir_is_kept_whatever_the_record() -> (
    None
):
    # E.g. a harness in another pid namespace: its pids mean nothing here, its lock does.
    facts = replace(NOTHING_ALIVE, lock_held=True)

    assert not sweep_decision(RECORD, facts).remove
    assert not sweep_decision(None, facts).remove


def test_given_harness_and_servers_gone_and_the_lock_free_when_judged_then_the_dir_is_removed() -> (
    None
):
    decision = sweep_decision(RECORD, NOTHING_ALIVE)

    assert decision.remove
    assert "gone" in decision.reason


def test_given_a_detached_server_alive_when_judged_then_its_dir_is_kept_without_any_owner() -> None:
    detached = replace(RECORD, owner=None, servers=(FIRST_SERVER,))
    facts = replace(NOTHING_ALIVE, living=frozenset({FIRST_SERVER}))

    assert not sweep_decision(detached, facts).remove


def test_given_a_detached_server_that_died_when_judged_then_its_dir_is_removed() -> None:
    detached = replace(RECORD, owner=None, servers=(FIRST_SERVER,))

    assert sweep_decision(detached, NOTHING_ALIVE).remove


def test_given_a_record_from_before_a_reboot_when_judged_then_start_times_prove_nothing() -> None:
    # Start times count from boot: after a reboot another process may match pid and ticks.
    facts = replace(NOTHING_ALIVE, boot_id="another-boot", living=frozenset({HARNESS}))

    decision = sweep_decision(RECORD, facts)

    assert decision.remove
    assert "reboot" in decision.reason


def test_given_no_record_and_a_recent_dir_when_judged_then_it_is_kept_as_being_set_up() -> None:
    facts = replace(NOTHING_ALIVE, age_seconds=5.0)

    assert not sweep_decision(None, facts).remove


def test_given_no_record_for_over_an_hour_and_no_live_server_when_judged_then_it_is_removed() -> (
    None
):
    assert sweep_decision(None, NOTHING_ALIVE).remove


@pytest.mark.parametrize("record", [None, RECORD])
def test_given_server_pid_names_a_live_server_in_the_dir_when_judged_then_it_is_kept(
    record: OwnerRecord | None,
) -> None:
    # An older harness version's dir, or a record that lost track: a live server wins.
    facts = replace(NOTHING_ALIVE, pid_file_server_alive=True)

    assert not sweep_decision(record, facts).remove


def test_given_an_owner_record_when_written_and_read_then_it_round_trips(tmp_path: Path) -> None:
    detached = replace(RECORD, owner=None)
    for record in (RECORD, detached):
        assert OwnerRecord.from_json(record.to_json()) == record


@pytest.mark.parametrize("content", ["", "{", "[]", '{"run_id": "x"}', '{"owner": 5}'])
def test_given_an_unreadable_owner_record_when_read_then_the_dir_counts_as_unclaimed(
    tmp_path: Path, content: str
) -> None:
    (tmp_path / "owner.json").write_text(content)

    assert read_owner_record(tmp_path) is None


def test_given_a_live_pid_with_another_start_time_when_checked_then_it_is_not_that_process() -> (
    None
):
    me = process_identity(os.getpid())
    assert me is not None

    assert is_alive(me)
    assert not is_alive(ProcessIdentity(me.pid, me.start_ticks - 1))


def test_given_a_sibling_dir_with_a_longer_name_when_matched_then_it_does_not_count() -> None:
    directory = Path("/tmp/creditwatch-pg-ab12")

    assert names_dir("postgres -D /tmp/creditwatch-pg-ab12/data -p 5", directory)
    assert names_dir("java -Dkafka.logs.dir=/tmp/creditwatch-pg-ab12 -cp x", directory)
    assert not names_dir("postgres -D /tmp/creditwatch-pg-ab123/data -p 5", directory)
