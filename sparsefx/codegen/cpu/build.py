"""Building the C++ kernels: a first build takes a minute or two on 2 cores and prints nothing (torch's own output
is off), so one line says what is happening when a load is slow; a cached build loads in well under a second and
stays silent."""

from __future__ import annotations

import contextlib
import logging
import threading

log = logging.getLogger(__name__)


@contextlib.contextmanager
def announce_if_slow(what: str, after_s: float = 3.0):
    """Log ``compiling <what> ...`` once if the block runs longer than ``after_s`` seconds (a compile, not a cache
    hit), from a timer thread, so a first run does not look hung."""
    timer = threading.Timer(after_s, log.info, ("compiling %s (once per environment: a minute or two on 2 cores)",
                                                what))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
