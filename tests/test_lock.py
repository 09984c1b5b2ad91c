"""The committed dvc.lock and metrics are what this code makes: every code dependency in dvc.lock
has the md5 of the file in the repository, every param the value in params.yaml, every stage of
dvc.yaml is locked, and every committed metrics file is the one dvc.lock recorded. So results
made by an older code state, older params or a resumed study cannot sit in the repository (the
full check, a fresh clone's `dvc repro` against them, is `python benchmarks/reproduce.py`)."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from conftest import ROOT

LOCK = ROOT / "dvc.lock"


def tracked(path: str) -> bool:
    return subprocess.run(["git", "ls-files", "--error-unmatch", path], cwd=ROOT, capture_output=True).returncode == 0


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def lock() -> dict:
    if not tracked("dvc.lock"):
        pytest.skip("no committed dvc.lock")
    return YAML(typ="safe").load(LOCK.read_text())["stages"]


def stage_names() -> list[str]:
    doc = YAML(typ="safe").load((ROOT / "dvc.yaml").read_text())["stages"]
    return sorted(f"{n}@{k}" if "foreach" in s else n for n, s in doc.items() for k in (s.get("foreach") or [None]))


def test_every_stage_is_locked(lock: dict) -> None:
    assert sorted(lock) == stage_names()


def test_locked_code_and_params_are_the_repositorys(lock: dict) -> None:
    params = YAML(typ="safe").load((ROOT / "params.yaml").read_text())
    stale = []
    for name, stage in lock.items():
        for dep in stage.get("deps", []):
            path = dep["path"]
            if tracked(path) and md5(ROOT / path) != dep.get("md5"):
                stale.append(f"{name}: {path}")
        for key, value in stage.get("params", {}).get("params.yaml", {}).items():
            node = params
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node != value:
                stale.append(f"{name}: param {key}")
    assert not stale, "dvc.lock was made with other code or params (run dvc repro and commit): " + ", ".join(stale)


def test_committed_metrics_are_the_locked_outputs(lock: dict) -> None:
    differ = [out["path"] for stage in lock.values() for out in stage.get("outs", [])
              if "md5" in out and not out["md5"].endswith(".dir") and tracked(out["path"])
              and md5(ROOT / out["path"]) != out["md5"]]
    assert not differ, f"committed outputs differ from what dvc.lock recorded: {differ}"
