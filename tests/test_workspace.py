"""One run at a time per workspace: a live run's claim stops a second one; a dead run's does not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from routecast.pipeline import procs
from routecast.pipeline.workspace import CLAIM, WorkspaceBusyError, claim, run_owner


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    (tmp_path / CLAIM).parent.mkdir(parents=True)
    return tmp_path


def hold(workspace: Path, pid: int, stage: str = "tune") -> None:
    (workspace / CLAIM).write_text(json.dumps({"pid": pid, "start": procs.start_ticks(pid), "boot": procs.boot_id(),
                                               "command": procs.command(pid), "stage": stage}))


@pytest.fixture
def other_run() -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_live_run_holds_the_workspace(workspace: Path, other_run: subprocess.Popen) -> None:
    hold(workspace, other_run.pid, "train_full@tuned")
    with pytest.raises(WorkspaceBusyError, match=rf"another run is using this workspace: .*time\.sleep.* \(pid "
                                                 rf"{other_run.pid}\) is at stage train_full@tuned"):
        claim("extract_traces", workspace)
    assert json.loads((workspace / CLAIM).read_text())["pid"] == other_run.pid  # left as it was


def test_a_dead_run_does_not(workspace: Path, other_run: subprocess.Popen) -> None:
    hold(workspace, other_run.pid)
    other_run.kill()
    other_run.wait()
    claim("extract_traces", workspace)
    held = json.loads((workspace / CLAIM).read_text())
    assert held["pid"] == os.getpid() and held["stage"] == "extract_traces"


def test_a_reused_pid_does_not(workspace: Path) -> None:
    pid = os.getppid()  # alive, and not this process
    hold(workspace, pid)
    held = json.loads((workspace / CLAIM).read_text())
    held["start"] -= 1  # recorded for an earlier process that had the same pid
    (workspace / CLAIM).write_text(json.dumps(held))
    claim("extract_traces", workspace)
    assert json.loads((workspace / CLAIM).read_text())["pid"] == os.getpid()


def test_later_stages_of_the_same_run_pass(workspace: Path) -> None:
    claim("extract_traces", workspace)
    claim("encode_features", workspace)
    assert json.loads((workspace / CLAIM).read_text())["stage"] == "encode_features"


@pytest.mark.parametrize("text", ["", "{not json", "[]", '{"pid": "x"}'])
def test_an_unreadable_claim_is_taken_over(workspace: Path, text: str) -> None:
    (workspace / CLAIM).write_text(text)
    claim("extract_traces", workspace)
    assert json.loads((workspace / CLAIM).read_text())["pid"] == os.getpid()


def test_outside_a_dvc_workspace_nothing_is_claimed(tmp_path: Path) -> None:
    claim("extract_traces", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_under_dvc_the_run_is_the_process_above_the_shell(tmp_path: Path) -> None:
    """DVC runs `$SHELL -c cmd`: the owner is DVC (here: this test process), not the shell."""
    code = "from routecast.pipeline.workspace import run_owner; print(run_owner())"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "DVC_STAGE": "tune"}
    # `; true` keeps bash alive above python (no exec of the last command).
    out = subprocess.run(["bash", "-c", f"{sys.executable} -c '{code}'; true"], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert int(out) == os.getpid()
    env.pop("DVC_STAGE")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert int(out) != os.getpid()  # by hand: the script itself
    assert run_owner() == os.getpid()


def test_a_second_stage_script_stops_in_one_line(workspace: Path) -> None:
    """Two stage scripts by hand: the second stops before its body runs; after the first ends, it passes."""
    body = ("import sys, time\nfrom pathlib import Path\nfrom routecast.pipeline.stage import stage\n"
            "with stage(sys.argv[1]):\n    Path(sys.argv[1]).write_text('ran')\n    time.sleep(float(sys.argv[2]))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVC_")} | {"PYTHONPATH": str(ROOT / "src")}
    first = subprocess.Popen([sys.executable, "-c", body, "first", "30"], cwd=workspace, env=env)
    try:
        deadline = time.monotonic() + 30
        while not (workspace / "first").exists():
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.1)
        second = subprocess.run([sys.executable, "-c", body, "second", "0"], cwd=workspace, env=env,
                                capture_output=True, text=True)
        assert second.returncode == 1 and not (workspace / "second").exists()
        assert f"second failed: {workspace.resolve()}: another run is using this workspace" in second.stderr
        assert f"(pid {first.pid}) is at stage first" in second.stderr and "Traceback" not in second.stderr
    finally:
        first.kill()
        first.wait()
    again = subprocess.run([sys.executable, "-c", body, "second", "0"], cwd=workspace, env=env,
                           capture_output=True, text=True)
    assert again.returncode == 0 and (workspace / "second").exists(), again.stderr
