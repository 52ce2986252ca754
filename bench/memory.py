"""Peak memory of a process and every process it started (Ray's raylet and workers included).

A sampler thread reads, every `interval` seconds (one by default: reading smaps_rollup costs about
20 ms per GB-sized process, and a finer sampler takes a share of a core from the run it measures), the proportional set size (PSS, Linux
`/proc/PID/smaps_rollup`) of the process and of all its living descendants, and keeps the largest
sum. PSS shares each shared page among the processes that map it, so the sum is the memory the
run really holds, not a multiple of the shared libraries. Without /proc the sampler reports None.
"""

from __future__ import annotations

import threading
from pathlib import Path

from federation.processes import descendants


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def tree_pss_bytes(pid: int) -> int:
    return 1024 * sum(_pss_kib(p) for p in (pid, *descendants(pid)))


class PeakMemory:
    """`with PeakMemory() as peak: ...` then `peak.bytes` (None without /proc)."""

    def __init__(self, pid: int | None = None, interval: float = 1.0) -> None:
        import os

        self.pid = pid or os.getpid()
        self.interval = interval
        self.bytes: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        if not Path("/proc/self/smaps_rollup").exists():
            return
        peak = 0
        while True:
            peak = max(peak, tree_pss_bytes(self.pid))
            self.bytes = peak
            if self._stop.wait(self.interval):
                break

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def gigabytes(self) -> float | None:
        return None if self.bytes is None else round(self.bytes / 1024**3, 3)
