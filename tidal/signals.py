"""How a `tidal` process (and a benchmark that starts servers) stops when it is told to."""
from __future__ import annotations

import signal
import threading


def exit_on_sigterm() -> None:
    """Make SIGTERM (`kill PID`, a scheduler stopping the job) unwind like an exception.

    By default SIGTERM ends Python at once: no `finally`, no atexit, so Prefect's temporary API
    server (a child process, stopped at exit) kept running after every killed run. Prefect's
    flow engine marks the run Crashed and then hands the signal on to this handler. The
    workspace is safe either way: every step writes atomically and a rerun resumes.
    """
    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():  # signals can only be set there
        signal.signal(signal.SIGTERM, handler)
