"""Peak memory of this process: the process-wide high-water mark, or sampled over one stage."""

from __future__ import annotations

import os
import resource
import threading

import torch


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB. VmHWM, not ru_maxrss: Linux carries ru_maxrss over
    fork and exec, so a process started by a bigger one would report its parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far (CPU) or peak allocated GPU memory, in MiB."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


class PeakMemory:
    """Peak resident memory (MiB) during a ``with`` block, sampled every 20 ms from /proc/self/statm.

    The process-wide maximum (``peak_memory_mb``) never resets, so when several stages share one
    process (``compare``) each stage's own peak has to be sampled.
    """

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak_mb = interval, 0.0
        self._stop = threading.Event()
        self._page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20

    def _sample(self) -> None:
        try:
            with open("/proc/self/statm") as f:
                self.peak_mb = max(self.peak_mb, int(f.read().split()[1]) * self._page_mb)
        except OSError:  # not Linux: fall back to the process-wide peak
            self.peak_mb = peak_memory_mb()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> PeakMemory:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    __enter__ = start

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
