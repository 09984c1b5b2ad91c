"""`routecast.stage.stage`: bad input is one line, a bug keeps its traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from routecast.errors import InputError
from routecast.params import ParamsError, SplitParams
from routecast.split import split_features
from routecast.traces import TraceError


def run_stage(body: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run `body` inside `with stage("demo"):` in a fresh interpreter."""
    code = ("from routecast.stage import stage\n"
            "from routecast.errors import InputError\n"
            "from routecast.traces import TraceError\n"
            "def helper():\n"
            f"    {body}\n"
            "with stage('demo'):\n"
            "    helper()\n")
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})


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


def test_params_and_trace_errors_are_input_errors() -> None:
    assert issubclass(ParamsError, InputError) and issubclass(InputError, ValueError)
    assert issubclass(TraceError, ValueError)


def test_too_few_sequences_to_split_is_bad_input() -> None:
    class Two:  # the two fields split_features reads before it refuses
        seq_id = np.array([0, 0, 1, 1])

    with pytest.raises(InputError, match="needs at least 3 sequences"):
        split_features(Two(), SplitParams())  # type: ignore[arg-type]
