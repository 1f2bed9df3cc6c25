"""What the kernel says about a process and the machine: /proc, read the same way everywhere.

CPU times are ``utime + stime`` (fields 14 and 15 of /proc/PID/stat, every thread), counted in
ticks of 10 ms; ``cpu_ns`` is the scheduler's own count in nanoseconds (/proc/PID/task/*/schedstat)
for steps too short or too light for ticks. Memory is VmRSS, descriptors are the entries of
/proc/PID/fd. A process that is gone raises OSError.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


class Proc:
    """One process by its pid."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def cpu_times(self) -> tuple[float, float]:
        """User and system CPU seconds so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK

    def cpu_seconds(self) -> float:
        user, system = self.cpu_times()
        return user + system

    def cpu_ns(self) -> int:
        """Nanoseconds on a CPU so far, user and kernel together, summed over the live threads
        (the first field of each /proc/PID/task/TID/schedstat): exact where ``cpu_times``
        counts 10 ms ticks, but a thread that has ended is no longer in the sum."""
        total = 0
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            try:
                total += int(Path(f"/proc/{self.pid}/task/{tid}/schedstat").read_text().split()[0])
            except (FileNotFoundError, ProcessLookupError):  # that thread ended in between
                continue
        return total

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all cores, /proc/stat): less what the
    bench's own processes used, what else ran during a step on a shared machine."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK


def own_cpu() -> float:
    """This process's CPU seconds (its threads, not its children)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"

