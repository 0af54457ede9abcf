"""CPU use of a group of processes, for benchmarks that must show CPU is not their limit."""

from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuSampler:
    """Cores used by ``pids`` together, in 0.5 s slices from now until ``stop()``, which
    returns the median slice: a process's start-up (a second or so of one core for a Python
    program importing torch) does not count as the cost of what it does afterwards. Kernel work
    done in a process's own context counts; network work in soft interrupts may not."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.slices: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _total(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids)

    def _run(self) -> None:
        last, then = self._total(), time.monotonic()
        while not self._stop.wait(0.5):
            now, at = self._total(), time.monotonic()
            self.slices.append((now - last) / (at - then))
            last, then = now, at

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return statistics.median(self.slices) if self.slices else float("nan")
