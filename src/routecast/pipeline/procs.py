"""Processes on this machine, as Linux's /proc shows them: is a recorded process still running,
and is it the same one (pids are reused, so a record carries the process's start time)?

Without /proc (another OS) the start time and names are unknown and a pid is taken at its word.
"""

from __future__ import annotations

import os
from pathlib import Path


def boot_id() -> str:
    """This boot of this machine: a start time means nothing across a reboot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (which may hold spaces)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, to tell a reused pid apart."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def parent(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[1]) if fields else None


def name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def command(pid: int) -> str:
    """The process's command line, as one string ("" if unknown)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def is_running(pid: int, start: int | None = None) -> bool:
    """Whether process `pid` exists and, given its recorded `start`, is still that process."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process (or no such pid at all)
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    fields = _stat(pid)
    if fields and fields[0] == "Z":  # dead, waiting to be reaped (a parent that never reaps, a container's init)
        return False
    now = int(fields[19]) if fields else None
    return start is None or now is None or now == start
