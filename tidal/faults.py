"""Named failpoints for crash-safety tests: `TIDAL_FAILPOINT=name` kills the process there.

SIGKILL gives no chance to clean up, exactly like a power cut or an OOM kill; the tests then
rerun and check that the experiment resumes to the same final state. With
`TIDAL_FAILPOINT_ACTION=hang` the process stops there instead (sleeps forever), like a rank of a
distributed run that stops answering: the other ranks must then time out, not wait forever.
`TIDAL_FAILPOINT_ACTION=term` sends SIGTERM instead, as `kill PID` or a scheduler stopping the
job does: the process may clean up.
"""
from __future__ import annotations

import os
import signal
import time


def failpoint(name: str) -> None:
    if os.environ.get("TIDAL_FAILPOINT") == name:
        action = os.environ.get("TIDAL_FAILPOINT_ACTION")
        if action == "hang":
            while True:
                time.sleep(3600)
        os.kill(os.getpid(), signal.SIGTERM if action == "term" else signal.SIGKILL)
