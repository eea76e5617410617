"""memory.py: the peak a block reaches is seen even when the block has freed it by the end."""

import time

import torch

import memory


def test_a_freed_allocation_still_counts_in_the_peak():
    mb = 256
    with memory.PeakMemory(torch.device("cpu")) as peak:
        start = memory.rss_bytes()
        block = torch.ones(mb * 2**20 // 4)  # written, so its pages are resident
        deadline = time.monotonic() + 30  # the sampler reads every 10 ms; a loaded machine is slower
        while peak.peak_bytes < start + mb * 2**20 * 0.9 and time.monotonic() < deadline:
            time.sleep(0.01)
        del block
        memory.release_free_heap()
        after = memory.rss_bytes()
    assert after < start + mb * 2**20 // 2  # freed before the block ended
    assert peak.peak_bytes >= start + mb * 2**20 * 0.9  # and still in the peak
    assert peak.kind == "process_rss"


def test_rss_by_kind_adds_up_to_the_resident_set():
    split = memory.rss_split()
    assert set(split) >= {"RssAnon", "RssFile"}
    assert abs(sum(split.values()) - memory.rss_bytes()) < 64 * 2**20
