"""Atomic writes: files follow the umask like any other program's, and a rewrite keeps the mode."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import ROOT
from routecast import artifacts
from routecast.artifacts import atomic_write_text, save_torch, write_csv, write_json
from routecast.params import load_params, write_tuned


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
