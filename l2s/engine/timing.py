"""Timing on a CPU or a GPU, one way everywhere: synchronised wall time, region timers, peak
memory.

``Clock`` times whole calls from a synchronised start to a synchronised end (jobs, benchmark
units); ``RegionTimer`` times regions inside the steering loop without synchronising (CUDA
events, read once the step's work is done). On a CPU both are ``time.perf_counter``.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable

import torch


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Clock:
    """Wall time of callables with the device synchronised, and peak memory."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mb(self) -> float:
        return round(peak_memory_mb(self.device), 1)

    def timed_call(self, fn: Callable[[], object]) -> tuple[float, object]:
        """(milliseconds, fn's result) of one call, from a synchronised start to its end."""
        self.sync()
        t0 = time.perf_counter()
        result = fn()
        self.sync()
        return (time.perf_counter() - t0) * 1000, result

    def measure(self, fn: Callable[[], object], repeats: int) -> dict:
        """{"ms": median, "all_ms": [...], "peak_mb": peak memory during the timed runs}."""
        fn()  # warm-up (kernel selection, allocator)
        self.sync()
        self.reset_peak()
        times = [self.timed_call(fn)[0] for _ in range(repeats)]
        return {"ms": round(statistics.median(times), 3),
                "all_ms": [round(t, 3) for t in times],
                "peak_mb": self.peak_mb()}


class RegionTimer:
    """Wall time of a region: CUDA events on a GPU (read after a sync), perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def stop(self, begin) -> Callable[[], float]:
        """A function giving the region's milliseconds (on a GPU: call it after a sync)."""
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            return lambda: begin.elapsed_time(end)
        ms = (time.perf_counter() - begin) * 1000
        return lambda: ms
