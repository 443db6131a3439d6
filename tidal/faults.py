"""Named failpoints for crash-safety tests: `TIDAL_FAILPOINT=name` kills the process there.

SIGKILL gives no chance to clean up, exactly like a power cut or an OOM kill; the tests then
rerun and check that the experiment resumes to the same final state.
"""
from __future__ import annotations

import os
import signal


def failpoint(name: str) -> None:
    if os.environ.get("TIDAL_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
