"""The plot views in dvc.yaml render with the real `dvc plots show` / `dvc plots diff`; the report's
PNG plots (routecast.report.plotting) draw exactly the series they are given."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pandas as pd
import pytest
from matplotlib.axes import Axes
from matplotlib.lines import Line2D
from ruamel.yaml import YAML

from conftest import ROOT, run
from routecast.report.page import external_urls

VIEWS = ["Training loss per epoch", "Validation accuracy per epoch", "Test top-2 per layer",
         "Confusion matrix of the tuned model", "Tune history", "Prefetch stall per token against cache slots",
         "Prefetch hit rate against width"]


def test_every_csv_view_plots_columns_its_stage_writes() -> None:
    """dvc.yaml's views name CSV columns; the stages write the headers of routecast.evaluate.names and
    routecast.sim.names, and the report's plots read a long-format CSV's (x, predictor, y) from its
    first three columns: all must agree."""
    from routecast.evaluate.names import CONFUSION_COLUMNS, PER_LAYER_COLUMNS
    from routecast.report import summary
    from routecast.sim.names import SLOTS_COLUMNS, WIDTH_COLUMNS

    headers = {summary.PER_LAYER_CSV: PER_LAYER_COLUMNS, summary.CONFUSION_CSV: CONFUSION_COLUMNS,
               summary.STALL_CSV: SLOTS_COLUMNS, summary.HIT_RATE_CSV: WIDTH_COLUMNS}
    seen = set()
    for name, view in declared_views().items():
        for path, y in view["y"].items():
            if path in headers:
                seen.add(path)
                header = headers[path]
                assert view["x"] in header and y in header, (name, path, header)
                if "predictor" in header:  # long format
                    assert (view["x"], "predictor", y) == header[:3], (name, path, header)
    assert seen == set(headers)


def plots_json(repo: Path, *args: str) -> dict:
    return json.loads(run(["dvc", "plots", *args, "--json"], repo).stdout)


def declared_views() -> dict[str, dict]:
    return {next(iter(v)): next(iter(v.values())) for v in YAML().load((ROOT / "dvc.yaml").read_text())["plots"]}


def test_dvc_yaml_declares_every_view_with_title_and_axis_labels() -> None:
    views = declared_views()
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
    ran = set(evaluate) - {"validation", "extra_tests"}  # the file's other blocks are not predictors
    assert {row["predictor"] for row in per_layer} == ran  # every predictor that ran, oracle included

    out = tmp_path / "html"
    run(["dvc", "plots", "show", "--out", str(out)], pipeline_repo)
    html = (out / "index.html").read_text()
    for name, view in declared_views().items():
        assert view["title"] in html, name
    assert html.count("vegaEmbed(") >= len(VIEWS)
    # DVC's own page loads Vega from a CDN: blank offline. The check below finds exactly that.
    assert any("cdn.jsdelivr.net" in url for url in external_urls(html)), external_urls(html)


def test_the_offline_plots_page_draws_every_view_with_no_external_resource(pipeline_repo: Path,
                                                                            tmp_path: Path) -> None:
    """`routecast plots` draws each view of dvc.yaml as inline SVG: no script, nothing fetched."""
    out = tmp_path / "plots.html"
    run(["routecast", "plots", "--out", str(out)], pipeline_repo)
    page = out.read_text(encoding="utf-8")
    assert external_urls(page) == []
    assert "<script" not in page.lower()
    body = ElementTree.fromstring(page.split("<body>", 1)[1].rsplit("</body>", 1)[0].join(["<body>", "</body>"]))
    sections = {s.findtext("h2"): s for s in body.iter("section")}
    assert set(sections) >= set(VIEWS), set(VIEWS) - set(sections)
    svg = "{http://www.w3.org/2000/svg}"
    for name in VIEWS:
        (drawing,) = sections[name].findall(f"{svg}svg")
        assert float(drawing.get("width")) > 100 and float(drawing.get("height")) > 100, name
        marks = [p for p in drawing.iter(f"{svg}path") if len(p.get("d") or "") > 20]
        assert len(marks) >= 3, f"{name}: {len(marks)} drawn paths"
        assert any(t.text and t.text.strip() for t in drawing.iter(f"{svg}text")), f"{name}: no axis text"


def test_the_url_check_finds_every_way_a_page_fetches() -> None:
    page = ('<script src="https://cdn.example/vega.js"></script><link rel=stylesheet href=//fonts.example/a.css>'
            "<style>@import 'http://x.example/b.css'; p{background:url( https://x.example/i.png )}</style>"
            '<svg xmlns="http://www.w3.org/2000/svg"><image xlink:href="http://x.example/c.png"/>'
            '<image href="data:image/png;base64,AAAA"/><a href="#local">x</a></svg>')
    assert [u.split("//")[1][:9] for u in external_urls(page)] == ["cdn.examp", "fonts.exa", "x.example",
                                                                    "x.example", "x.example"]


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
    predictors = {k: v for k, v in AFTER.items() if k not in ("oracle", "extra_tests")}
    write_results(tmp_path, predictors, 0.0, seed=0)
    shown = plots_json(tmp_path, "show")  # other plots' files are absent here: only this view counts
    assert not [e for e in shown.get("errors", []) if e["name"] == "Test top-2 per layer"], shown["errors"]
    rows = shown["data"]["Test top-2 per layer"][0]["content"]["data"]["values"]
    assert {row["predictor"] for row in rows} == set(predictors)


# The report's PNGs: each figure's lines before it is saved.

def lines_of(ax: Axes) -> dict[str, Line2D]:
    return {line.get_label(): line for line in ax.get_lines()}


def assert_line(line: Line2D, x: list, y: list, dashed: bool = False) -> None:
    np.testing.assert_allclose(np.asarray(line.get_xdata(), float), x)
    np.testing.assert_allclose(np.asarray(line.get_ydata(), float), y)
    assert (line.get_linestyle() == "--") is dashed


def long_frame(x: str, y: str, series: dict[str, list[float]]) -> pd.DataFrame:
    return pd.DataFrame([{x: i + 1, "predictor": name, y: v} for name, values in series.items()
                         for i, v in enumerate(values)])


def test_per_layer_plot_draws_every_predictor_and_only_the_changed_revision_lines() -> None:
    from routecast.report import plotting

    now = long_frame("layer", "top2", {"baseline": [0.5, 0.6, 0.7], "tuned": [0.55, 0.65, 0.75],
                                        "oracle": [0.8, 0.8, 0.9]})
    old = long_frame("layer", "top2", {"baseline": [0.5, 0.6, 0.7], "tuned": [0.45, 0.55, 0.65],
                                        "lookup_1": [0.4, 0.4, 0.4]})
    fig = plotting.per_layer_top2(now.sample(frac=1.0, random_state=0), old, ("workspace", "main"), lookahead=1)
    lines = lines_of(fig.axes[0])
    # unchanged baseline: no dashed twin; changed tuned and the revision-only lookup_1: dashed
    assert set(lines) == {"baseline", "tuned", "oracle", "_tuned (main)", "_lookup_1 (main)"}
    assert_line(lines["tuned"], [1, 2, 3], [0.55, 0.65, 0.75])
    assert_line(lines["_tuned (main)"], [1, 2, 3], [0.45, 0.55, 0.65], dashed=True)
    assert_line(lines["_lookup_1 (main)"], [1, 2, 3], [0.4, 0.4, 0.4], dashed=True)
    assert lines["_tuned (main)"].get_color() == lines["tuned"].get_color()
    assert lines["tuned"].get_linewidth() > lines["oracle"].get_linewidth()  # the models stand out
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["baseline", "tuned", "oracle"]
    assert fig.axes[0].get_ylim() == (0.0, 1.0)


def test_training_curves_plot_every_dvclive_series_of_both_models() -> None:
    from routecast.report import plotting

    def run_(top2: list[float], loss: list[float] | None = None) -> pd.DataFrame:
        frame = pd.DataFrame({"step": range(len(top2)), "val_top2": top2, "val_loss": [2.0] * len(top2),
                              "val_set_recall": [0.3] * len(top2)})
        return frame.assign(train_loss=loss) if loss else frame

    runs = {"baseline": run_([0.3, 0.4, 0.5], [2.1, 2.0, 1.9]), "tuned": run_([0.45])}  # a mixture: one step
    fig = plotting.training_curves(runs, {"baseline": run_([0.3, 0.4, 0.5]), "tuned": run_([0.40])},
                                   ("workspace", "main"))
    panels = {ax.get_title(): lines_of(ax) for ax in fig.axes}
    assert set(panels["training loss"]) == {"baseline"}  # tuned has no train_loss series
    assert_line(panels["training loss"]["baseline"], [0, 1, 2], [2.1, 2.0, 1.9])
    top2 = panels["validation top-2 accuracy"]
    assert set(top2) == {"baseline", "tuned", "_tuned (main)"}
    assert_line(top2["tuned"], [0], [0.45])
    assert_line(top2["_tuned (main)"], [0], [0.40], dashed=True)
    assert set(panels["validation set recall"]) == {"baseline", "tuned"}  # unchanged: no dashed line


def test_tune_history_marks_trials_without_a_value() -> None:
    from routecast.report import plotting

    history = pd.DataFrame({"step": [2, 0, 1, 3], "value": [0.5, 0.3, np.nan, np.nan],
                            "best_so_far": [0.5, 0.3, 0.3, 0.5]})
    reference = pd.DataFrame({"step": [0, 1], "value": [0.2, 0.25], "best_so_far": [0.2, 0.25]})
    fig = plotting.tune_history(history, reference, ("workspace", "main"))
    ax = fig.axes[0]
    lines = lines_of(ax)
    assert_line(lines["best so far (workspace)"], [0, 1, 2, 3], [0.3, 0.3, 0.5, 0.5])
    assert_line(lines["best so far (main)"], [0, 1], [0.2, 0.25], dashed=True)
    pruned = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
    assert sorted(line.get_xdata()[0] for line in pruned) == [1, 3]
    (points,) = ax.collections
    np.testing.assert_allclose(points.get_offsets(), [[0, 0.3], [2, 0.5]])


@pytest.mark.parametrize(("function", "x", "y"), [("prefetch_stall", "slots", "stall_ms_per_token"),
                                                  ("prefetch_hit_rate", "width", "hit_rate")])
def test_prefetch_plots_draw_the_bounds_and_every_predictor(function: str, x: str, y: str) -> None:
    from routecast.report import plotting

    series = {"on_demand": [0.9, 0.6, 0.3], "perfect": [0.5, 0.3, 0.1], "tuned": [0.8, 0.5, 0.2],
              "lookup_3": [0.85, 0.55, 0.25]}
    old = long_frame(x, y, {**series, "tuned": [0.82, 0.5, 0.2]})
    fig = getattr(plotting, function)(long_frame(x, y, series), old, ("workspace", "main"))
    lines = lines_of(fig.axes[0])
    assert set(lines) == {*series, "_tuned (main)"}
    for name, values in series.items():
        assert_line(lines[name], [1, 2, 3], values)
    assert_line(lines["_tuned (main)"], [1, 2, 3], [0.82, 0.5, 0.2], dashed=True)
    assert lines["on_demand"].get_color() != lines["perfect"].get_color()


def test_every_name_has_one_colour_and_unknown_names_take_spare_ones() -> None:
    from routecast.report import plotting

    colours = list(plotting.PREDICTOR_COLOURS.values())
    assert len(set(colours)) == len(colours)
    names = ["tuned", "new_a", "new_b"]
    assert plotting.colour_of("new_b", names) == plotting.SPARE_COLOURS[1]
    assert plotting.colour_of("new_b", names) not in colours
