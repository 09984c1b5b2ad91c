"""What every stage script shares: logging, timing (and peak memory), and one clear line for bad input.

Bad input (`InputError`, which `ParamsError`, `TraceError` and `PredictionsError` are; a missing
input file) is told in one line and exits 1. Any other exception is a bug and propagates with its
full traceback.
A stage first claims the workspace (`routecast.pipeline.workspace`), so two runs never interleave.
Run by DVC, a failing stage also says which outputs DVC removed before running it and how to
get the last locked versions back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from routecast.errors import InputError
from routecast.pipeline.workspace import claim

log = logging.getLogger("routecast")


def recovery_hint() -> str:
    """Under DVC (which sets DVC_STAGE and DVC_ROOT): the stage's outputs in dvc.lock that are
    gone now, and the commands that restore them; "" when none are gone or DVC did not run us."""
    name, root = os.environ.get("DVC_STAGE"), Path(os.environ.get("DVC_ROOT", "."))
    if not name:
        return ""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    try:
        outs = YAML(typ="safe").load((root / "dvc.lock").read_text())["stages"][name].get("outs", [])
        gone = [str(out["path"]) for out in outs if not (root / out["path"]).exists()]
    except (OSError, YAMLError, KeyError, TypeError, AttributeError):
        return ""  # never locked (a first run): nothing to restore
    if not gone:
        return ""
    return (f"DVC removed {', '.join(gone)} before running {name}; the last locked versions come back with "
            f"`dvc checkout {name}` (outputs in the DVC cache) and `git checkout -- FILE` (metrics and plots kept "
            "in Git)")


@contextlib.contextmanager
def stage(name: str, exclusive: bool = True) -> Iterator[None]:
    """Run a stage body: log its time; on bad params or input, print the error and exit 1.

    `exclusive`: claim the workspace first (every stage that writes into it does).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s",
                        datefmt="%H:%M:%S")
    start = time.perf_counter()
    try:
        if exclusive:
            claim(name)
        yield
    except (InputError, FileNotFoundError) as exc:
        hint = recovery_hint()
        log.error("%s failed: %s%s", name, exc, f". {hint}" if hint else "")
        sys.exit(1)
    except Exception:
        hint = recovery_hint()
        if hint:
            log.error("%s", hint)
        raise
    log.info("%s done in %.1fs, peak memory %.2f GiB", name, time.perf_counter() - start, peak_gib())


def peak_gib() -> float:
    """This process's peak resident memory so far, in GiB (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
