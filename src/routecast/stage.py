"""What every stage script shares: logging, timing, and one clear line for bad input.

Bad input (`InputError`, which `ParamsError` is; `TraceError`; a missing input file) is told
in one line and exits 1. Any other exception is a bug and propagates with its full traceback.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator

from routecast.errors import InputError
from routecast.traces import TraceError

log = logging.getLogger("routecast")


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Run a stage body: log its time; on bad params or input, print the error and exit 1."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        datefmt="%H:%M:%S")
    start = time.perf_counter()
    try:
        yield
    except (InputError, TraceError, FileNotFoundError) as exc:
        log.error("%s failed: %s", name, exc)
        sys.exit(1)
    log.info("%s done in %.1fs", name, time.perf_counter() - start)
