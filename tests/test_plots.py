"""The plot views in dvc.yaml render with the real `dvc plots show` / `dvc plots diff`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from conftest import ROOT, run

VIEWS = ["Training loss per epoch", "Validation accuracy per epoch", "Test top-2 per layer",
         "Confusion matrix of the tuned model", "Tune history", "Prefetch stall per token against cache slots",
         "Prefetch hit rate against width"]


def plots_json(repo: Path, *args: str) -> dict:
    return json.loads(run(["dvc", "plots", *args, "--json"], repo).stdout)


def test_dvc_yaml_declares_every_view_with_title_and_axis_labels() -> None:
    views = {next(iter(v)): next(iter(v.values())) for v in YAML().load((ROOT / "dvc.yaml").read_text())["plots"]}
    assert set(VIEWS) <= set(views)
    for name in VIEWS:
        assert {"title", "x_label", "y_label"} <= set(views[name]), name
        template = views[name].get("template")
        if template and template not in ("linear", "confusion", "confusion_normalized"):
            assert (ROOT / ".dvc" / "plots" / f"{template}.json").exists(), template


@pytest.mark.slow
def test_plots_show_renders_every_view(pipeline_repo: Path, tmp_path: Path) -> None:
    shown = plots_json(pipeline_repo, "show")
    assert not shown.get("errors"), shown["errors"]
    for name in VIEWS:
        (rendered,) = shown["data"][name]
        assert rendered["type"] == "vega"
        assert rendered["content"]["data"]["values"], f"{name}: no data"
    per_layer = shown["data"]["Test top-2 per layer"][0]["content"]["data"]["values"]
    evaluate = json.loads((pipeline_repo / "metrics" / "evaluate.json").read_text())
    assert {row["predictor"] for row in per_layer} == set(evaluate)  # every predictor that ran, oracle included

    out = tmp_path / "html"
    run(["dvc", "plots", "show", "--out", str(out)], pipeline_repo)
    html = (out / "index.html").read_text()
    for title in ("Training loss per epoch", "Validation top-1 and top-2 accuracy per epoch",
                  "Test top-2 accuracy per source layer", "Tuned model on the test split", "Tune history"):
        assert title in html, title
    assert html.count("vegaEmbed(") >= len(VIEWS)


@pytest.mark.slow
def test_plots_diff_against_a_revision_renders(pipeline_repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "diff"
    run(["dvc", "plots", "diff", "HEAD", "--out", str(out)], pipeline_repo)
    assert "Test top-2 accuracy per source layer" in (out / "index.html").read_text()


def test_per_layer_view_follows_whichever_predictors_ran(tmp_path: Path) -> None:
    """No oracle, a speculative gate: the long-format view still draws every predictor (a wide
    file listing a missing column would drop the whole plot)."""
    from test_report import AFTER, write_results

    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy2(ROOT / name, tmp_path / name)
    run(["git", "init", "-q", "-b", "main"], tmp_path)
    run(["dvc", "init", "-q"], tmp_path)
    shutil.copytree(ROOT / ".dvc" / "plots", tmp_path / ".dvc" / "plots")
    predictors = {k: v for k, v in AFTER.items() if k != "oracle"}
    write_results(tmp_path, predictors, 0.0, seed=0)
    shown = plots_json(tmp_path, "show")  # other plots' files are absent here: only this view counts
    assert not [e for e in shown.get("errors", []) if e["name"] == "Test top-2 per layer"], shown["errors"]
    rows = shown["data"]["Test top-2 per layer"][0]["content"]["data"]["values"]
    assert {row["predictor"] for row in rows} == set(predictors)
