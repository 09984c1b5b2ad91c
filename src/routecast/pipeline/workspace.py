"""One pipeline run at a time in a workspace.

DVC releases its repository lock while a stage's command runs, and its per-file locks cover
only the files a running stage declares: a second `dvc repro -s ...`, or a stage script run by
hand, could rewrite the inputs of a first run between or during its stages. So every stage
script claims the workspace for the run it belongs to: the `dvc` process that runs it (the
claim then holds across all the stages of one `dvc repro` / `dvc exp run`), or the script
itself when run by hand. A live claim by another run stops the stage with one line; the claim
of a run that ended or was killed is taken over, so a crash never blocks the next run.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

from routecast.errors import InputError
from routecast.pipeline import procs

CLAIM = Path(".dvc/tmp/routecast-run.json")  # in the workspace: DVC's own scratch directory, never committed
SHELLS = {"sh", "bash", "dash", "zsh", "fish", "ksh"}


class WorkspaceBusyError(InputError):
    """Another pipeline run holds the workspace."""


def workspace_root() -> Path:
    """The workspace a stage runs in: DVC's repository root when DVC runs it, else the current directory."""
    return Path(os.environ.get("DVC_ROOT") or ".")


def run_owner() -> int:
    """The process a stage runs for: under DVC (which sets DVC_STAGE) the nearest ancestor that is
    not the shell DVC ran the command with, i.e. the `dvc` process; by hand, this process."""
    if not os.environ.get("DVC_STAGE"):
        return os.getpid()
    pid = os.getppid()
    while procs.name(pid) in SHELLS:
        up = procs.parent(pid)
        if not up or up <= 1:
            break
        pid = up
    return pid


def claim(stage: str, root: Path | None = None) -> None:
    """Claim the workspace at `root` for this stage's run, or raise `WorkspaceBusyError` naming the
    run that holds it. A directory without `.dvc/` is not a pipeline workspace: nothing to claim."""
    root = workspace_root() if root is None else root
    if not (root / CLAIM).parent.is_dir():
        return
    owner = run_owner()
    mine = {"pid": owner, "start": procs.start_ticks(owner), "boot": procs.boot_id(), "command": procs.command(owner),
            "stage": stage}
    with open(root / CLAIM, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file closes
        fh.seek(0)
        held = _parse(fh.read())
        if held and _other_live_run(held, mine):
            raise WorkspaceBusyError(
                f"{root.resolve()}: another run is using this workspace: "
                f"`{held['command'] or 'pid ' + str(held['pid'])}` (pid {held['pid']}) is at stage {held['stage']}. "
                "Wait for it to end (or stop it): this run would rewrite files it reads. To run side by side, use "
                "`dvc exp run --temp` or `--queue`, which run in a copy")
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps(mine) + "\n")


def _parse(text: str) -> dict[str, Any] | None:
    try:
        held = json.loads(text)
    except ValueError:
        return None  # empty (first claim) or cut short by a crash: nobody holds it
    return held if isinstance(held, dict) and isinstance(held.get("pid"), int) else None


def _other_live_run(held: dict[str, Any], mine: dict[str, Any]) -> bool:
    if (held["pid"], held.get("start")) == (mine["pid"], mine["start"]):
        return False  # an earlier stage of this same run
    if held.get("boot") != mine["boot"]:
        return False  # recorded before the machine rebooted
    return procs.is_running(held["pid"], held.get("start"))
