"""How many processes a replay uses by default: the cores this process may use, a
container's CPU limit included (``shared.parallel.default_jobs``)."""

from __future__ import annotations

import os
from pathlib import Path

from shared.parallel import default_jobs

CORES = len(os.sched_getaffinity(0))


def test_given_no_cgroup_quota_then_the_cores_it_may_run_on_at_most_eight(tmp_path: Path) -> None:
    assert default_jobs(tmp_path) == min(CORES, 8)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert default_jobs(tmp_path) == min(CORES, 8)
    assert default_jobs(tmp_path, most=1) == 1


def test_given_a_cgroup_v2_quota_of_one_core_then_one_even_on_a_bigger_host(
    tmp_path: Path,
) -> None:
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    assert default_jobs(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("50000 100000\n")  # half a core: still one process
    assert default_jobs(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("2500000 100000\n")  # 25 cores: the host's, at most 8
    assert default_jobs(tmp_path) == min(CORES, 8)


def test_given_a_cgroup_v1_quota_then_it_counts_too(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert default_jobs(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # no quota
    assert default_jobs(tmp_path) == min(CORES, 8)


def test_given_an_unreadable_quota_then_the_cores(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("garbage")
    assert default_jobs(tmp_path) == min(CORES, 8)
