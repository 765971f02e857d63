"""Peak memory while a streamed surgery runs: the process's resident memory, sampled
from ``/proc``, and CUDA's own counter."""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["MemoryWatch", "give_back", "large_allocations_mapped"]


class MemoryWatch:
    """Peak memory of this process while the block runs, beyond what it was at its
    start: ``peak_host_bytes``, its anonymous memory (what it allocated: tensors,
    buffers; the shards' memory-mapped pages, which the kernel may drop at any time,
    are not counted), ``peak_rss_bytes``, its whole resident memory (those pages
    included), both sampled from ``/proc``; and the device's (CUDA's counter)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = self.peak = _memory()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _sample(self) -> None:
        now = _memory()
        self.peak = (max(self.peak[0], now[0]), max(self.peak[1], now[1]))

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            self._sample()

    def __enter__(self) -> MemoryWatch:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def report(self) -> dict[str, int | None]:
        """``peak_host_bytes``, ``peak_rss_bytes`` (beyond the start) and
        ``peak_device_bytes`` (``None`` off CUDA)."""
        self._sample()
        device = None
        if self.device.type == "cuda":
            device = int(torch.cuda.max_memory_allocated(self.device))
        return {
            "peak_host_bytes": max(0, self.peak[0] - self.start[0]),
            "peak_rss_bytes": max(0, self.peak[1] - self.start[1]),
            "peak_device_bytes": device,
        }


def _memory() -> tuple[int, int]:
    """``(anonymous, resident)`` bytes of this process (zeros where ``/proc`` is not)."""
    found = {"RssAnon:": 0, "VmRSS:": 0}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":", 1)[0] + ":"
                if key in found:
                    found[key] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return found["RssAnon:"], found["VmRSS:"]


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _libc()


def give_back() -> None:
    """Return the memory freed since the last call to the system (glibc's
    ``malloc_trim``; nothing elsewhere). A block's tensors, once freed, otherwise stay
    in the allocator's heap, and a streamed surgery's resident memory would grow with
    the number of blocks although what it holds does not."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers (glibc's malloc.h)
M_MMAP_THRESHOLD = -3
DURING = {M_MMAP_THRESHOLD: 1 << 20, M_TRIM_THRESHOLD: 128 << 10}
# after: where glibc's sliding thresholds end once a large chunk has been freed
AFTER = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 64 << 20}


@contextmanager
def large_allocations_mapped() -> Iterator[None]:
    """While the block runs, glibc serves every allocation of 1 MiB or more (a
    tensor's storage) with its own mapping, unmapped when freed, and gives back the
    free memory above 128 KiB at the top of its heaps (``mallopt``'s
    ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD``; nothing elsewhere).

    By default glibc raises both each time a mapped chunk is freed (to 32 and 64
    MiB), then serves tensors below 32 MiB from its heaps, where freed memory is
    reused only by allocations that fit the holes, and keeps up to 64 MiB free at
    the top of each: a streamed surgery's peak grew by some 220 MiB over its first
    six 1B-shaped blocks before levelling off (``docs/benchmarks.md``, bench_scale).
    Afterwards both are set where glibc's own sliding thresholds end once a large
    chunk (a block's weights) has been freed, as they would have been without this."""
    libc = _LIBC if _LIBC is not None and hasattr(_LIBC, "mallopt") else None
    if libc is not None:
        for k, v in DURING.items():
            libc.mallopt(k, v)
    try:
        yield
    finally:
        if libc is not None:
            for k, v in AFTER.items():
                libc.mallopt(k, v)
