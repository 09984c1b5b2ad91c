"""The DVC behaviours users rely on, each driving the real `dvc` command on a tiny copy of the repo."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import clone_pipeline, copy_repo, run

pytestmark = pytest.mark.slow


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


@pytest.fixture(scope="module")
def repro_repo(pipeline_repo: Path) -> Path:
    return pipeline_repo


def test_repro_runs_every_stage_in_order(repro_repo: Path) -> None:
    out = (repro_repo.parent / "repro.log").read_text()
    assert stages_run(out) == ["extract_traces", "encode_features", "split_95_5", "tune", "train_full@baseline",
                               "train_full@tuned", "evaluate", "simulate_prefetch"]


def test_repro_then_status_clean_and_second_repro_runs_nothing(repro_repo: Path) -> None:
    status = run(["dvc", "status"], repro_repo).stdout
    assert "up to date" in status, status
    again = run(["dvc", "repro"], repro_repo).stdout
    assert stages_run(again) == [], again
    metrics = json.loads((repro_repo / "metrics" / "evaluate.json").read_text())
    for name in ("baseline", "tuned", "frequency", "lookup_1"):
        assert set(metrics[name]) >= {"top1", "top2", "set_recall", "exact_set", "n_test"}
        assert 0.0 <= metrics[name]["top1"] <= metrics[name]["top2"] <= 1.0


def test_metrics_show_lists_both_models(repro_repo: Path) -> None:
    shown = run(["dvc", "metrics", "show"], repro_repo).stdout
    assert "baseline.top2" in shown and "tuned.top2" in shown, shown
    for name in ("on_demand", "perfect", "baseline", "tuned", "lookup_3"):
        assert f"{name}.stall_ms_per_token" in shown and f"{name}.gap_closed" in shown, shown


def test_same_params_and_seed_give_identical_metrics(repro_repo: Path, tmp_path: Path) -> None:
    other = copy_repo(tmp_path)
    run(["dvc", "repro"], other)
    for name in ("evaluate.json", "tune.json", "prefetch.json"):
        first = json.loads((repro_repo / "metrics" / name).read_text())
        second = json.loads((other / "metrics" / name).read_text())
        first.pop("wall_seconds", None), second.pop("wall_seconds", None)
        assert first == second, name


def test_exp_run_retrains_only_tuned_with_float_lr_and_metrics_diff(pipeline_repo: Path, tmp_path: Path) -> None:
    repro_repo = clone_pipeline(pipeline_repo, tmp_path / "repo")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    run([*git, "add", "-A"], repro_repo)
    run([*git, "commit", "-qm", "pipeline results"], repro_repo)
    out = run(["dvc", "exp", "run", "-S", "tuned.lr=1e-6"], repro_repo).stdout
    assert stages_run(out) == ["train_full@tuned", "evaluate", "simulate_prefetch"], out
    assert "lr: 1e-06" in (repro_repo / "params.yaml").read_text()
    checkpoint = torch.load(repro_repo / "data" / "models" / "tuned.pt", weights_only=True)
    first_epoch_lr = checkpoint["history"][0]["lr"]
    assert isinstance(first_epoch_lr, float) and first_epoch_lr == pytest.approx(1e-6)
    diff = run(["dvc", "metrics", "diff", "--md"], repro_repo).stdout
    assert re.search(r"tuned\.top2\s*\|", diff), diff
    assert "baseline.top2" not in diff  # unchanged metrics are not listed
