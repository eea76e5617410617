"""Memory measurement: peak process memory while a block runs, and returning freed heap to the OS."""

from __future__ import annotations

import contextlib
import os

import torch


def release_free_heap() -> None:
    """Hand freed heap memory back to the OS (glibc), so RSS shows what is really in use.

    Loading a model frees large temporary buffers that the C allocator would
    otherwise keep, inflating every later RSS reading by the loading peak.
    """
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def rss_bytes() -> int:
    """This process's resident set size in bytes (Linux /proc; elsewhere its peak, ru_maxrss)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_split() -> dict:
    """Resident memory by kind (RssAnon, RssFile, RssShmem), in bytes (Linux /proc)."""
    with open("/proc/self/status") as fh:
        fields = dict(line.split(":", 1) for line in fh if line.startswith("Rss"))
    return {k: int(v.split()[0]) * 1024 for k, v in fields.items()}


class PeakMemory:
    """Peak memory while a block runs: CUDA max_memory_allocated, or process RSS sampled every 10 ms."""

    def __init__(self, device):
        self.device, self.peak_bytes, self._stop = device, 0, None

    def _sample(self) -> None:
        """Background loop: keep the largest RSS seen."""
        while not self._stop.wait(0.01):
            self.peak_bytes = max(self.peak_bytes, rss_bytes())

    def __enter__(self):
        import gc
        import threading

        gc.collect()
        release_free_heap()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_bytes = rss_bytes()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, rss_bytes())
        return False

    @property
    def kind(self) -> str:
        """What was measured, for metrics.json."""
        return "cuda_max_memory_allocated" if self.device.type == "cuda" else "process_rss"


