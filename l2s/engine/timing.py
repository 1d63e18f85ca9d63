"""Timing on a CPU or a GPU, one way everywhere: synchronised wall time, region timers, peak
memory.

``Clock`` times whole calls from a synchronised start to a synchronised end (jobs, benchmark
units); ``RegionTimer`` times regions inside the steering loop without synchronising (CUDA
events, read once the step's work is done). On a CPU both are ``time.perf_counter``.
``OpCounter`` counts the ATen operations a call dispatches: a small batch on a GPU is bound by
kernel launches, and their number is the same on a CPU, so launch overhead can be read there.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


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

    def measure(self, fn: Callable[[], object], repeats: int, count_ops: bool = False) -> dict:
        """{"ms": median, "all_ms": [...], "peak_mb": peak memory during the timed runs,
        "warmup_ms": the first call (kernel selection, allocator; a compilation)}, and with
        ``count_ops`` "ops" (``OpCounter.counts``) of one untimed call after the warm-up."""
        warmup_ms = self.timed_call(fn)[0]
        ops = None
        if count_ops:
            with OpCounter() as counter:
                fn()
            ops = counter.counts()
        self.sync()
        self.reset_peak()
        times = [self.timed_call(fn)[0] for _ in range(repeats)]
        res = {"ms": round(statistics.median(times), 3),
               "all_ms": [round(t, 3) for t in times],
               "peak_mb": self.peak_mb(), "warmup_ms": round(warmup_ms, 3)}
        if ops is not None:
            res["ops"] = ops
        return res


# Operations that only make a new view of existing memory: no kernel runs for them.
_METADATA_OPS = {torch.ops.aten._unsafe_view.default, torch.ops.aten._reshape_alias.default}


class OpCounter(TorchDispatchMode):
    """Count the ATen operations dispatched while open, backward passes included.

    ``kernels`` leaves out views (no kernel runs for a view), so on a GPU it approximates the
    kernel launches; ``host_reads`` counts reads of a tensor's value by the host (``.item()``,
    ``bool(t)``, ``int(t)``), each of which synchronises a GPU. ``.tolist()`` and ``.cpu()`` of
    a CUDA tensor are counted as ``device_to_host`` copies (a CPU run has none).
    ``host_tensors`` counts tensors made from Python data (``torch.tensor(...)``): made on a
    GPU, each is a copy from the host, which synchronises it (on a CPU run they are counted
    wherever they are made).
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = self.kernels = self.host_reads = self.device_to_host = 0
        self.host_tensors = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.total += 1
        if func is torch.ops.aten._local_scalar_dense.default:
            self.host_reads += 1
        elif func is torch.ops.aten.lift_fresh.default:
            self.host_tensors += 1
        elif not func.is_view and func not in _METADATA_OPS:
            self.kernels += 1
            if (func is torch.ops.aten._to_copy.default and isinstance(out, torch.Tensor)
                    and out.device.type == "cpu" and isinstance(args[0], torch.Tensor)
                    and args[0].device.type != "cpu"):
                self.device_to_host += 1
        return out

    def counts(self) -> dict:
        return {"total": self.total, "kernels": self.kernels, "host_reads": self.host_reads,
                "device_to_host": self.device_to_host, "host_tensors": self.host_tensors}


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
