"""bench/common.py's CPU accounting: the benchmarks' CPU-per-request figures rest on it."""

from __future__ import annotations

import os
import subprocess
import sys

from bench.common import tree_cpu

# Burns about ``seconds`` of CPU in a grandchild (a child that forks one and waits for it),
# so that both a descendant still running and one already reaped are exercised.
BURN = """
import os, sys, time
def burn(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
pid = os.fork()
if pid == 0:
    burn(float(sys.argv[1]))
    os._exit(0)
burn(float(sys.argv[1]))
os.waitpid(pid, 0)
print("done", flush=True)
sys.stdin.read()  # stay alive (the grandchild reaped) until told to go
"""


def test_given_descendants_when_they_burn_cpu_then_the_tree_counts_them_running_and_reaped() -> (
    None
):
    before = tree_cpu(os.getpid())
    child = subprocess.Popen(
        [sys.executable, "-c", BURN, "0.3"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "done"
        # The child is alive and has reaped its own child: both burns are counted.
        running = tree_cpu(os.getpid()) - before
        assert running >= 0.55, running
        assert tree_cpu(child.pid) >= 0.55
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(10)
    # Reaped by us now: its time (and its child's) moved to our children's time.
    assert tree_cpu(os.getpid()) - before >= 0.55


def test_given_a_sibling_burning_cpu_then_an_idle_process_tree_does_not_count_it() -> None:
    idle = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    busy = subprocess.Popen(
        [sys.executable, "-c", BURN, "0.3"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert busy.stdout is not None and busy.stdout.readline().strip() == "done"
        assert tree_cpu(busy.pid) >= 0.55
        assert tree_cpu(idle.pid) < 0.3  # its interpreter's start-up only
    finally:
        for proc in (idle, busy):
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(10)
