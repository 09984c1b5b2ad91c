"""Atomic writes: files follow the umask like any other program's, and a rewrite keeps the mode."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import ROOT
from routecast.config.params import load_params, write_tuned
from routecast.pipeline import artifacts, procs
from routecast.pipeline.artifacts import atomic_write_text, save_torch, write_csv, write_json


@pytest.fixture(params=[0o022, 0o077, 0o002], ids=lambda m: f"umask{m:03o}")
def mask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


WRITERS: dict[str, Callable[[Path], None]] = {
    "text": lambda p: atomic_write_text(p, "x\n"),
    "json": lambda p: write_json(p, {"a": 1}),
    "csv": lambda p: write_csv(p, ["a"], [[1]]),
    "torch": lambda p: save_torch(p, {"a": 1}),
}


@pytest.mark.parametrize("writer", WRITERS)
def test_a_new_file_follows_the_umask(writer: str, mask: int, tmp_path: Path) -> None:
    path = tmp_path / "sub" / "out.bin"
    WRITERS[writer](path)
    assert mode(path) == 0o666 & ~mask
    # As open() would have made it, under the same umask.
    (tmp_path / "plain").write_text("x")
    assert mode(path) == mode(tmp_path / "plain")
    assert [p.name for p in path.parent.iterdir()] == ["out.bin"]  # no temporary left


def test_a_rewritten_file_keeps_its_mode(mask: int, tmp_path: Path) -> None:
    path = tmp_path / "out.json"
    path.write_text("{}")
    path.chmod(0o640)
    write_json(path, {"a": 1})
    assert mode(path) == 0o640 and path.read_text() == '{\n  "a": 1\n}\n'


def test_params_yaml_keeps_its_mode_after_tune_writes_it(mask: int, tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    path.chmod(0o664)
    write_tuned(load_params(path).baseline, path)
    assert mode(path) == 0o664
    assert load_params(path).tuned == load_params(path).baseline


def test_umask_is_read_without_changing_it(mask: int, monkeypatch: pytest.MonkeyPatch) -> None:
    assert artifacts.umask() == mask
    assert os.umask(mask) == mask  # unchanged by reading it
    real = Path.read_text

    def no_proc(self: Path, *args: object, **kwargs: object) -> str:
        if str(self) == "/proc/self/status":
            raise OSError("no /proc")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", no_proc)
    assert artifacts.umask() == mask  # the fallback restores it
    assert os.umask(mask) == mask


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_killed_writers_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    dead, live = dead_pid(), os.getpid()
    stale = tmp_path / f".out.json.{dead}.abcd1234.tmp"
    kept = [tmp_path / f".out.json.{live}.abcd1234.tmp",  # a live writer's (maybe concurrent)
            tmp_path / ".out.json.abcd1234.tmp",  # no pid: not ours to judge
            tmp_path / f".other.json.{dead}.abcd1234.tmp"]  # another file's
    for path in [stale, *kept]:
        path.write_text("partial")
    write_json(out, {"a": 1})
    assert not stale.exists() and all(path.exists() for path in kept)
    assert json.loads(out.read_text()) == {"a": 1}


def start_writer(code: str, out: Path) -> subprocess.Popen:
    """A Python process running `code` with `out` as its argument; its stdout piped (text)."""
    return subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src")})


def test_a_killed_write_leaves_a_temporary_that_the_next_write_removes(tmp_path: Path) -> None:
    out = tmp_path / "data" / "traces.bin"
    code = ("import sys, time\nfrom routecast.pipeline.artifacts import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n    tmp.write_text('half')\n    print(tmp, flush=True)\n"
            "    time.sleep(60)\n")
    writer = start_writer(code, out)
    tmp = Path(writer.stdout.readline().strip())
    assert tmp.parent == out.parent and f".traces.bin.{writer.pid}." in tmp.name
    write_json(out, {"b": 2})  # a concurrent write leaves the live writer's temporary alone
    assert tmp.exists()
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert tmp.exists()  # what a SIGKILL leaves behind
    write_json(out, {"c": 3})
    assert sorted(p.name for p in out.parent.iterdir()) == ["traces.bin"]


def test_an_unreaped_killed_writer_counts_as_gone(tmp_path: Path) -> None:
    """A writer killed but never reaped (its parent died too, and a container's init does not
    reap) stays a zombie that `kill(pid, 0)` still finds: its temporaries are stale all the same."""
    out = tmp_path / "out.json"
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # not waited for: a zombie once it exits
    try:
        deadline = time.monotonic() + 30
        while procs._stat(zombie.pid)[0] != "Z":
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.05)
        assert not procs.is_running(zombie.pid)
        stale = tmp_path / f".out.json.{zombie.pid}.abcd1234.tmp"
        stale.write_text("partial")
        write_json(out, {"a": 1})
        assert not stale.exists()
    finally:
        zombie.wait()


def test_a_killed_trace_writer_leaves_nothing_after_the_next_write(tmp_path: Path) -> None:
    """The trace writer's scratch file of row keys is named like a temporary of the trace, so the
    next write of the trace removes it along with the half-written trace."""
    out = tmp_path / "data" / "traces.parquet"
    code = ("import sys, time\nfrom routecast.data.traces import TraceMeta, TraceWriter\n"
            "meta = TraceMeta(num_layers=2, num_experts=4, top_k=2, source='test', source_params={})\n"
            "with TraceWriter(sys.argv[1], meta) as w:\n    print('open', flush=True)\n    time.sleep(60)\n")
    writer = start_writer(code, out)
    assert writer.stdout.readline().strip() == "open"
    left = sorted(p.name for p in out.parent.iterdir())
    assert len(left) == 2 and any(name.endswith(".keys.tmp") for name in left), left
    assert all(name.startswith(f".traces.parquet.{writer.pid}.") for name in left), left
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    write_json(out, {"c": 3})  # any write of the trace's path
    assert sorted(p.name for p in out.parent.iterdir()) == ["traces.parquet"]
