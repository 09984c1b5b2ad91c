"""`routecast report`: Markdown with the metrics and params diffs against a git revision, and PNGs.

The fast tests build a repository with the project's dvc.yaml and params.yaml and two commits of
hand-written results, so every delta is known exactly; the slow one reports on a real tiny run.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, run, set_params

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])


def scores(top1: float, top2: float, set_recall: float) -> dict[str, float]:
    return {"top1": top1, "top2": top2, "set_recall": set_recall, "exact_set": top1 / 2, "n_test": 400}


def write_results(repo: Path, evaluate: dict[str, dict], tuned_top2_shift: float, seed: int) -> None:
    """Every file the report reads, as the stages would write them."""
    (repo / "metrics").mkdir(exist_ok=True)
    (repo / "metrics" / "evaluate.json").write_text(json.dumps(evaluate, indent=2))
    for model, shift in (("baseline", 0.0), ("tuned", tuned_top2_shift)):
        write_csv(repo / "metrics" / "train" / f"{model}.csv",
                  ["epoch", "train_loss", "val_loss", "val_top1", "val_top2", "lr", "seconds"],
                  [[e, 2.1 - 0.1 * e, 2.15 - 0.08 * e, 0.15 + 0.02 * e, 0.25 + 0.03 * e + shift, 1e-3, 1.0]
                   for e in range(1, 5)])
    names = list(evaluate)
    write_csv(repo / "metrics" / "evaluate" / "per_layer_top2.csv", ["layer", *names],
              [[layer, *(evaluate[n]["top2"] + 0.01 * layer for n in names)] for layer in range(8)])
    write_csv(repo / "metrics" / "evaluate" / "per_layer_top2_long.csv", ["layer", "predictor", "top2"],
              [[layer, n, evaluate[n]["top2"] + 0.01 * layer] for n in names for layer in range(8)])
    rng = np.random.default_rng(seed)
    actual = rng.integers(0, 8, 400)
    predicted = np.where(rng.random(400) < 0.4, actual, rng.integers(0, 8, 400))
    write_csv(repo / "metrics" / "evaluate" / "confusion_tuned.csv", ["actual", "predicted"],
              np.stack([actual, predicted], axis=1).tolist())
    write_csv(repo / "metrics" / "tune" / "history.csv", ["trial", "state", "val_top2", "best_so_far", "seconds"],
              [[0, "COMPLETE", 0.30, 0.30, 2.0], [1, "PRUNED", "", 0.30, 0.5],
               [2, "COMPLETE", 0.33 + tuned_top2_shift, 0.33 + tuned_top2_shift, 2.0]])


BEFORE = {"baseline": scores(0.20, 0.35, 0.30), "tuned": scores(0.22, 0.30, 0.31),
          "frequency": scores(0.17, 0.30, 0.26), "oracle": scores(0.59, 0.75, 0.47)}
AFTER = {"baseline": scores(0.20, 0.35, 0.30), "tuned": scores(0.25, 0.35, 0.3125),
         "frequency": scores(0.17, 0.30, 0.26), "oracle": scores(0.59, 0.75, 0.47),
         "speculative_gate": scores(0.40, 0.55, 0.45)}


@pytest.fixture(scope="module")
def two_commit_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """main: results at tuned.lr 0.000536; HEAD: tuned.lr 3e-4, better tuned, a new predictor."""
    repo = tmp_path_factory.mktemp("two_commits")
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy2(ROOT / name, repo / name)
    run(["git", "init", "-q", "-b", "main"], repo)
    run(["dvc", "init", "-q"], repo)
    shutil.copytree(ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")
    set_params(repo / "params.yaml", {"tuned.lr": 0.000536})
    write_results(repo, BEFORE, 0.0, seed=0)
    run([*GIT, "add", "-A"], repo)
    run([*GIT, "commit", "-qm", "results"], repo)
    set_params(repo / "params.yaml", {"tuned.lr": 3e-4})
    write_results(repo, AFTER, 0.05, seed=1)
    run([*GIT, "commit", "-qam", "lower tuned lr"], repo)
    return repo


@pytest.fixture(scope="module")
def report(two_commit_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.md"
    run(["routecast", "report", "--rev", "HEAD~1", "--rev-label", "main", "--out", str(out)], two_commit_repo)
    return out


def table_row(markdown: str, first_cell: str) -> list[str]:
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row for {first_cell!r} in:\n{markdown}")


def test_metrics_table_holds_every_predictor_with_its_delta(report: Path) -> None:
    md = report.read_text()
    assert "| predictor | top-1 | top-2 | set recall |" in md
    assert table_row(md, "**tuned**")[1:] == ["0.2200 → **0.2500** (+0.0300)", "0.3000 → **0.3500** (+0.0500)",
                                             "0.3100 → **0.3125** (+0.0025)"]
    assert table_row(md, "**baseline**")[1:] == ["0.2000 (=)", "0.3500 (=)", "0.3000 (=)"]
    assert table_row(md, "oracle")[2] == "0.7500 (=)"
    assert table_row(md, "speculative_gate")[2] == "— → **0.5500**"  # new in the workspace
    assert "Tuned model, test top-2: 0.3000 → **0.3500** (+0.0500)" in md
    # Every other metric that changed (tuned.exact_set) is listed; unchanged ones are not.
    assert "tuned.exact_set" in md and "baseline.exact_set" not in md


def test_params_table_lists_the_changed_param_as_written(report: Path) -> None:
    md = report.read_text()
    assert table_row(md, "`tuned.lr`") == ["`tuned.lr`", "0.000536", "0.0003"]
    assert "`baseline.lr`" not in md


def test_images_exist_are_valid_pngs_and_are_linked(report: Path) -> None:
    from matplotlib.image import imread

    md = report.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(links) == ["confusion_tuned.png", "per_layer_top2.png", "training_curves.png", "tune_history.png"]
    for link in links:
        image = report.parent / link
        assert image.read_bytes()[:8] == PNG_MAGIC, link
        height, width, _ = imread(image).shape
        assert width >= 400 and height >= 300, (link, width, height)
        assert image.stat().st_size < 200_000, link  # small enough for a PR comment


def test_report_on_an_unknown_revision_fails_clearly(two_commit_repo: Path, tmp_path: Path) -> None:
    proc = run(["routecast", "report", "--rev", "no-such-rev", "--out", str(tmp_path / "r.md")], two_commit_repo,
               check=False)
    assert proc.returncode == 1
    assert "no-such-rev" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_report_on_a_real_tiny_run(pipeline_repo: Path, tmp_path: Path) -> None:
    """The tiny pipeline's results against its first commit (which has no results yet)."""
    out = tmp_path / "report.md"
    run(["routecast", "report", "--rev", "HEAD", "--out", str(out)], pipeline_repo)
    md = out.read_text()
    evaluate = json.loads((pipeline_repo / "metrics" / "evaluate.json").read_text())
    for name, metrics in evaluate.items():
        cells = table_row(md, f"**{name}**" if name in ("baseline", "tuned") else name)
        assert cells[2] == f"— → **{metrics['top2']:.4f}**", cells
    for image in ("training_curves", "per_layer_top2", "confusion_tuned", "tune_history"):
        assert f"({image}.png)" in md
        assert (tmp_path / f"{image}.png").read_bytes()[:8] == PNG_MAGIC

