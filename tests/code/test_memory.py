"""tidal.memory: the peak-memory reading behind the scoring-memory benchmarks."""
from __future__ import annotations


def test_peak_rss_covers_what_the_process_holds_now():
    """VmHWM in MB: never below the current RSS, which a touched 64 MB block raises by about 64 MB."""
    import os

    import numpy as np

    from tidal.memory import peak_rss_mb, status_kb

    rss_before = status_kb("VmRSS") / 1024
    block = np.ones(64 * 2**20, dtype=np.uint8)  # touched: resident
    rss_now = status_kb("VmRSS") / 1024
    assert rss_now >= rss_before + 50
    machine_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    assert rss_now - 1 <= peak_rss_mb() < machine_mb  # MB: the same figure in kB would exceed the machine
    del block
