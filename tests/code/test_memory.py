"""tidal.memory: the peak-memory reading behind the scoring-memory benchmarks."""
from __future__ import annotations


def test_peak_rss_is_this_process_high_water_mark():
    """tidal.memory reads VmHWM: at least the current RSS, and it rises after a large allocation."""
    import numpy as np

    from tidal.memory import peak_rss_mb, status_kb

    before = peak_rss_mb()
    assert before >= status_kb("VmRSS") / 1024 - 1
    block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MB, touched
    assert peak_rss_mb() >= before + 50 or before > status_kb("VmRSS") / 1024 + 50
    del block
