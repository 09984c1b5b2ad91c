"""`routecast.pipeline.stage.stage`: bad input is one line, a bug keeps its traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from routecast.config.params import ParamsError, SplitParams
from routecast.data.predictions import PredictionsError
from routecast.data.split import split_features
from routecast.data.traces import TraceError
from routecast.errors import InputError


def run_stage(body: str, tmp_path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `body` inside `with stage("demo"):` in a fresh interpreter (not under DVC unless `env` says so)."""
    code = ("from routecast.pipeline.stage import stage\n"
            "from routecast.errors import InputError\n"
            "from routecast.data.traces import TraceError\n"
            "def helper():\n"
            f"    {body}\n"
            "with stage('demo'):\n"
            "    helper()\n")
    base = {k: v for k, v in os.environ.items() if not k.startswith("DVC_")}
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**base, "PYTHONPATH": str(ROOT / "src"), **(env or {})})


@pytest.mark.parametrize("body, message", [
    ("raise InputError('data/x.parquet: row 3: bad')", "data/x.parquet: row 3: bad"),
    ("raise TraceError('log.jsonl: line 2: not valid JSON')", "log.jsonl: line 2: not valid JSON"),
    ("open('absent.parquet')", "[Errno 2] No such file or directory: 'absent.parquet'"),
])
def test_bad_input_is_one_line(body: str, message: str, tmp_path: Path) -> None:
    proc = run_stage(body, tmp_path)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line]
    assert len(errors) == 1 and errors[0].endswith(f"routecast ERROR: demo failed: {message}"), proc.stderr


@pytest.mark.parametrize("body, kind", [
    ("raise ValueError('an internal invariant broke')", "ValueError: an internal invariant broke"),
    ("int('x')", "ValueError: invalid literal for int()"),
    ("[][0]", "IndexError: list index out of range"),
])
def test_a_bug_keeps_its_traceback(body: str, kind: str, tmp_path: Path) -> None:
    proc = run_stage(body, tmp_path)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and kind in proc.stderr, proc.stderr
    assert "in helper" in proc.stderr  # it points at the line that raised
    assert "demo failed" not in proc.stderr and "demo done" not in proc.stderr


def test_params_trace_and_predictions_errors_are_input_errors() -> None:
    assert issubclass(ParamsError, InputError) and issubclass(InputError, ValueError)
    assert issubclass(TraceError, InputError) and issubclass(PredictionsError, InputError)


def test_too_few_sequences_to_split_is_bad_input() -> None:
    class Two:  # the two fields split_features reads before it refuses
        seq_id = np.array([0, 0, 1, 1])

    with pytest.raises(InputError, match="needs at least 3 distinct sequences"):
        split_features(Two(), SplitParams())  # type: ignore[arg-type]


def test_under_dvc_the_error_names_removed_outputs_and_how_to_restore_them(tmp_path: Path) -> None:
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  train_full@tuned:\n    cmd: x\n    outs:\n"
                                       "    - path: data/models/tuned.pt\n      md5: a\n"
                                       "    - path: metrics/train/tuned.csv\n      md5: b\n")
    (tmp_path / "metrics" / "train").mkdir(parents=True)
    (tmp_path / "metrics" / "train" / "tuned.csv").write_text("kept\n")
    env = {"DVC_STAGE": "train_full@tuned", "DVC_ROOT": str(tmp_path)}
    hint = ("DVC removed data/models/tuned.pt before running train_full@tuned; the last locked versions come back "
            "with `dvc checkout train_full@tuned`")
    bad_input = run_stage("raise InputError('bad')", tmp_path, env)
    assert bad_input.returncode == 1 and f"demo failed: bad. {hint}" in bad_input.stderr, bad_input.stderr
    bug = run_stage("raise KeyError('x')", tmp_path, env)
    assert hint in bug.stderr and "Traceback" in bug.stderr, bug.stderr
    # Nothing gone, or not run by DVC: no hint.
    (tmp_path / "data" / "models").mkdir(parents=True)
    (tmp_path / "data" / "models" / "tuned.pt").write_bytes(b"")
    assert "DVC removed" not in run_stage("raise InputError('bad')", tmp_path, env).stderr
    (tmp_path / "data" / "models" / "tuned.pt").unlink()
    assert "DVC removed" not in run_stage("raise InputError('bad')", tmp_path, {}).stderr
