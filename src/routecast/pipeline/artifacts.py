"""Artifact I/O: every file is written under a temporary name and renamed into place, so a
killed stage never leaves a file that looks valid.

The temporary name carries the writer's pid (`.<name>.<pid>.<random>.tmp`), so the next write
of the same file removes the temporaries a killed writer left, and never a live writer's."""

from __future__ import annotations

import contextlib
import csv
import glob
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from routecast.pipeline import procs

log = logging.getLogger(__name__)


def umask() -> int:
    """The process's umask, read without changing it (Linux: /proc/self/status); elsewhere it
    is set and restored at once, which a thread creating a file in between could notice."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The file gets the mode any program would give it: a rewritten file keeps its mode, a new
    one gets 0o666 less the umask (mkstemp's own 0600 would lock a team out of a shared DVC
    cache).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            mode = 0o666 & ~umask()
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporaries of `path` whose writer process is gone; return them.

    A live pid keeps its file, even if the pid was reused: a leftover kept a while longer does
    no harm, a live writer's file removed would.
    """
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\..+\.tmp")
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        match = pattern.fullmatch(tmp.name)
        if match and not procs.is_running(int(match.group(1))):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    if removed:
        log.info("removed %d temporary file(s) of %s left by killed writers", len(removed), path)
    return removed


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_csv(path: str | Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def copy_file(src: str | Path, dst: str | Path) -> None:
    """`src`'s bytes at `dst`, atomically."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def save_torch(path: str | Path, obj: Any) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
