"""`routecast report`: Markdown with the metrics (with intervals), prefetch and params diffs against a
git revision, and PNGs.

The fast tests build a repository with the project's dvc.yaml and params.yaml and two commits of
hand-written results whose intervals are chosen so each verdict (real, within noise, not judged)
is known in advance; the slow one reports on a real tiny run.
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
from routecast.report.headline import headline
from routecast.report.page import external_urls

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
IMAGES = ["confusion_tuned.png", "per_layer_top2.png", "prefetch_hit_rate.png", "prefetch_stall.png",
          "training_curves.png", "tune_history.png"]


def write_csv(path: Path, header: list[str], rows: list[list[object]], delimiter: str = ",") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        csv.writer(fh, delimiter=delimiter).writerows([header, *rows])


def scores(top1: tuple, top2: tuple, set_recall: tuple, sequences: int = 20, **extra: object) -> dict[str, object]:
    """An evaluate.json block: each metric as (value, lo, hi)."""
    out: dict[str, object] = {}
    for name, (value, lo, hi) in {"top1": top1, "top2": top2, "set_recall": set_recall}.items():
        out.update({name: value, f"{name}_lo": lo, f"{name}_hi": hi})
    return {**out, "exact_set": top1[0] / 2, "exact_set_lo": top1[1] / 2, "exact_set_hi": top1[2] / 2,
            "n_test": 4000, "n_test_sequences": sequences, **extra}


def vs(**diffs: tuple) -> dict[str, dict[str, float]]:
    return {name: {"top2_diff": d, "top2_diff_lo": lo, "top2_diff_hi": hi} for name, (d, lo, hi) in diffs.items()}


def oracle_share(value: float, lo: float, hi: float) -> dict[str, float]:
    return {"top2_vs_oracle": value, "top2_vs_oracle_lo": lo, "top2_vs_oracle_hi": hi}


BASELINE = scores((0.200, 0.190, 0.210), (0.350, 0.340, 0.360), (0.300, 0.290, 0.310),
                  **oracle_share(0.467, 0.450, 0.480))
BEFORE = {
    "baseline": BASELINE,
    "tuned": scores((0.220, 0.200, 0.240), (0.300, 0.285, 0.315), (0.310, 0.300, 0.320),
                    **oracle_share(0.400, 0.380, 0.420),
                    vs=vs(baseline=(-0.050, -0.060, -0.040), frequency=(0.003, -0.004, 0.010),
                          lookup_3=(0.004, -0.003, 0.011), oracle=(-0.450, -0.470, -0.430))),
    "frequency": scores((0.170, 0.160, 0.180), (0.297, 0.287, 0.307), (0.260, 0.250, 0.270)),
    "lookup_3": scores((0.210, 0.200, 0.220), (0.296, 0.286, 0.306), (0.290, 0.280, 0.300)),
    "oracle": scores((0.590, 0.580, 0.600), (0.750, 0.740, 0.760), (0.470, 0.460, 0.480)),
}
AFTER = {
    "baseline": BASELINE,
    # top-1 +1.0 point, intervals overlap: within noise; top-2 +5.0, intervals disjoint: real
    "tuned": scores((0.230, 0.210, 0.250), (0.350, 0.335, 0.365), (0.314, 0.304, 0.324),
                    **oracle_share(0.467, 0.417, 0.517),
                    vs=vs(baseline=(0.0, -0.010, 0.010), frequency=(0.003, -0.004, 0.010),
                          lookup_3=(0.012, 0.004, 0.020), oracle=(-0.008, -0.016, -0.001),
                          speculative_gate=(-0.200, -0.220, -0.180))),
    "frequency": BEFORE["frequency"],
    "lookup_3": scores((0.210, 0.200, 0.220), (0.338, 0.328, 0.348), (0.290, 0.280, 0.300)),
    "oracle": scores((0.590, 0.580, 0.600), (0.358, 0.348, 0.368), (0.470, 0.460, 0.480)),
    "speculative_gate": scores((0.400, 0.380, 0.420), (0.550, 0.530, 0.570), (0.450, 0.430, 0.470)),
    "extra_tests": {"p1": {
        "baseline": scores((0.100, 0.050, 0.150), (0.200, 0.150, 0.250), (0.150, 0.100, 0.200), sequences=4),
        "tuned": scores((0.120, 0.070, 0.170), (0.260, 0.210, 0.310), (0.170, 0.120, 0.220), sequences=4,
                        vs=vs(baseline=(0.060, 0.030, 0.090))),
    }},
}


def prefetch(tuned_stall: float) -> dict[str, object]:
    """metrics/prefetch.json: on_demand stalls 100 ms, perfect 40 (a gap of 60)."""
    def block(stall: float, hit: float) -> dict[str, object]:
        return {"hit_rate": hit, "prefetch_precision": 0.5, "mb_per_token": 1000.0, "stall_ms_per_token": stall,
                "ms_per_token": stall + 20.0, "speedup_vs_on_demand": 120.0 / (stall + 20.0),
                "gap_closed": (100.0 - stall) / 60.0}
    return {"on_demand": block(100.0, 0.5), "perfect": block(40.0, 0.9), "baseline": block(80.0, 0.6),
            "tuned": block(tuned_stall, 0.7),
            "replay": {"sequences": 20, "tokens": 640, "missing_layers": 0, "predicted_share": 1.0},
            "engine": {"expert_mb": 352.321536, "transfer_ms": 14.09286144, "compute_ms_per_layer": 0.68,
                       "slots_per_layer": 3, "width": 2}}


def write_results(repo: Path, evaluate: dict[str, dict], shift: float, seed: int) -> None:
    """Every file the report reads, as the stages (and DVCLive) would write them."""
    (repo / "metrics").mkdir(exist_ok=True)
    (repo / "metrics" / "evaluate.json").write_text(json.dumps(evaluate, indent=2))
    (repo / "metrics" / "prefetch.json").write_text(json.dumps(prefetch(70.0 - 100 * shift), indent=2))
    (repo / "metrics" / "headline.json").write_text(json.dumps(
        headline(evaluate, prefetch(70.0 - 100 * shift), "mlp" if shift == 0 else "gru"), ensure_ascii=False))
    for model, delta in (("baseline", 0.0), ("tuned", shift)):
        series = {"train_loss": lambda e: 2.1 - 0.1 * e, "val_loss": lambda e: 2.15 - 0.08 * e,
                  "val_top2": lambda e, delta=delta: 0.25 + 0.03 * e + delta,
                  "val_set_recall": lambda e: 0.2 + 0.02 * e}
        for name, value in series.items():
            write_csv(repo / "metrics" / "train" / model / "plots" / "metrics" / f"{name}.tsv", ["step", name],
                      [[e, value(e)] for e in range(4)], delimiter="\t")
    names = [n for n in evaluate if n != "extra_tests"]
    write_csv(repo / "metrics" / "evaluate" / "per_layer_top2.csv", ["layer", "predictor", "top2"],
              [[layer, n, evaluate[n]["top2"] + 0.01 * layer] for n in names for layer in range(8)])
    rng = np.random.default_rng(seed)
    actual = rng.integers(0, 8, 400)
    predicted = np.where(rng.random(400) < 0.4, actual, rng.integers(0, 8, 400))
    write_csv(repo / "metrics" / "evaluate" / "confusion_tuned.csv", ["actual", "predicted"],
              np.stack([actual, predicted], axis=1).tolist())
    live = repo / "metrics" / "tune" / "live" / "plots" / "metrics"
    write_csv(live / "value.tsv", ["step", "value"], [[0, 0.30], [1, "nan"], [2, 0.33 + shift]], delimiter="\t")
    write_csv(live / "best_so_far.tsv", ["step", "best_so_far"], [[0, 0.30], [1, 0.30], [2, 0.33 + shift]],
              delimiter="\t")
    bounds_and_models = ["on_demand", "perfect", "baseline", "tuned"]
    write_csv(repo / "metrics" / "prefetch" / "stall_vs_slots.csv",
              ["slots", "predictor", "stall_ms_per_token", "hit_rate", "mb_per_token"],
              [[s, n, 100.0 / s + i + shift, 0.5, 1000.0]
               for s in range(2, 9) for i, n in enumerate(bounds_and_models)])
    write_csv(repo / "metrics" / "prefetch" / "hit_rate_vs_width.csv",
              ["width", "predictor", "hit_rate", "stall_ms_per_token", "prefetch_precision"],
              [[w, n, 0.1 * w + 0.05 * i, 50.0, 0.5] for w in range(1, 4) for i, n in enumerate(bounds_and_models)])


def make_repo(repo: Path) -> Path:
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy2(ROOT / name, repo / name)
    run(["git", "init", "-q", "-b", "main"], repo)
    run(["dvc", "init", "-q"], repo)
    shutil.copytree(ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")
    return repo


@pytest.fixture(scope="module")
def two_commit_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """main: results at tuned.lr 0.000536; HEAD: tuned.lr 3e-4, better tuned, a new predictor, an extra test."""
    repo = make_repo(tmp_path_factory.mktemp("two_commits"))
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


def section(markdown: str, title: str) -> str:
    """The text under a `### title` (or `#### title`) heading, up to the next heading of that level."""
    level = re.match(r"#+", title).group(0)
    start = markdown.index(title + "\n")
    end = markdown.find("\n" + level + " ", start + len(title))
    return markdown[start: end if end >= 0 else None]


def table_row(markdown: str, first_cell: str) -> list[str]:
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row for {first_cell!r} in:\n{markdown}")


def test_the_headline_comes_first_and_the_detail_is_folded_below_it(report: Path) -> None:
    """What the PR comment shows before any click: the headline table (base -> PR); all else folded."""
    markdown = report.read_text()
    first_table = markdown.index("\n|")
    assert first_table < markdown.index("<details><summary>Detail") < markdown.index("### Test metrics")
    assert markdown.index("### Plots") < markdown.rindex("</details>")
    assert table_row(markdown, "tuned kind")[1:] == ["mlp", "gru", "changed"]
    # tuned top-2 30.0 -> 35.0; the best reference in the workspace is speculative_gate (55.0): gain -20.
    assert table_row(markdown, "tuned, test top-2 (%)")[1:] == ["30.0", "35.0", "+5"]
    gain = table_row(markdown, "tuned − speculative_gate (best reference), paired, points (at `main`: frequency)")
    assert gain[1:] == ["0.3", "-20.0", "-20.3"]
    page = report.parent / "plots.html"  # every `dvc plots diff` view, offline, beside the report
    assert page.exists() and external_urls(page.read_text(encoding="utf-8")) == []
    assert "plots.html" in markdown


def test_metrics_cells_hold_intervals_and_call_a_change_real_only_when_they_do_not_overlap(report: Path) -> None:
    md = section(report.read_text(), "### Test metrics")
    assert "| predictor | top-1 | top-2 | set recall |" in md
    assert table_row(md, "**tuned**")[1:] == [
        "0.220 [0.200, 0.240] → 0.230 [0.210, 0.250] (+1.0 pts, within noise)",
        "0.300 [0.285, 0.315] → **0.350 [0.335, 0.365]** (+5.0 pts, real)",
        "0.310 [0.300, 0.320] → 0.314 [0.304, 0.324] (+0.4 pts, within noise)"]
    assert table_row(md, "**baseline**")[1:] == ["0.200 [0.190, 0.210] (=)", "0.350 [0.340, 0.360] (=)",
                                                "0.300 [0.290, 0.310] (=)"]
    # lookup_3 +4.2: [0.286, 0.306] and [0.328, 0.348] are disjoint; the oracle falls (real too)
    assert table_row(md, "lookup_3")[2] == "0.296 [0.286, 0.306] → **0.338 [0.328, 0.348]** (+4.2 pts, real)"
    assert table_row(md, "oracle")[2] == "0.750 [0.740, 0.760] → **0.358 [0.348, 0.368]** (-39.2 pts, real)"
    assert table_row(md, "speculative_gate")[2] == "— → 0.550 [0.530, 0.570]"  # new in the workspace
    assert "Test split: 20 sequences, 4,000 samples." in md and "differs" not in md
    assert report.read_text().count("Tuned model, test top-2: "
                                    "0.300 [0.285, 0.315] → **0.350 [0.335, 0.365]** (+5.0 pts, real)") == 1


def test_tuned_leads_are_stated_only_where_the_paired_interval_excludes_zero(report: Path) -> None:
    md = section(report.read_text(), "### Test metrics")
    bullets = [line for line in md.splitlines() if line.startswith("- ")]
    assert bullets == [
        "- tuned vs baseline: +0.0 points [-1.0, 1.0], within noise (at `main`: -5.0 points [-6.0, -4.0], behind)",
        "- tuned vs frequency: +0.3 points [-0.4, 1.0], within noise",
        "- tuned beats lookup_3 by +1.2 points [0.4, 2.0] (at `main`: +0.4 points [-0.3, 1.1], within noise)",
        "- tuned trails oracle by -0.8 points [-1.6, -0.1] (at `main`: -45.0 points [-47.0, -43.0], behind)",
        "- tuned trails speculative_gate by -20.0 points [-22.0, -18.0] (none at `main`)"]
    assert ("Top-2 as a share of the oracle's (synthetic traces): **baseline** 0.467 [0.450, 0.480] (=); "
            "**tuned** 0.400 [0.380, 0.420] → 0.467 [0.417, 0.517] (+6.7 pts, within noise).") in md


def test_extra_tests_get_their_own_tables_and_too_few_sequences_are_not_judged(report: Path) -> None:
    md = section(report.read_text(), "### Cross-trace tests")
    p1 = section(md, "#### `p1`")
    assert "Only 4 test sequences" in p1
    assert table_row(p1, "**tuned**")[2] == "— → 0.260 [0.210, 0.310]"
    assert "- tuned vs baseline: +6.0 points [3.0, 9.0], not judged: 4 test sequences (none at `main`)" in p1
    assert "beats" not in p1


def test_prefetch_table_shows_stall_gap_closed_and_speedup_beside_the_bounds(report: Path) -> None:
    md = section(report.read_text(), "### Prefetch simulation")
    assert "| predictor | stall (ms/token) | gap closed | speedup vs on_demand | hit rate |" in md
    rows = [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[1:] == ["on_demand (bound: no prediction)", "perfect (bound: the true experts)", "**baseline**",
                        "**tuned**"]
    # tuned 70 -> 65 ms: gap closed 30/60 -> 35/60 (+0.08333); speedup 120/90 -> 120/85 (+0.07843)
    assert table_row(md, "**tuned**")[1:] == ["70.00 → **65.00** (-5)", "0.500 → **0.583** (+0.0833)",
                                             "1.333 → **1.412** (+0.0784)", "0.700 (=)"]
    assert table_row(md, "on_demand (bound: no prediction)")[1:4] == ["100.00 (=)", "0.000 (=)", "1.000 (=)"]
    assert "preset `mixtral_bf16_pcie4`" in md and "one expert 352.3 MB, 14.09 ms over the link" in md


def test_other_changed_metrics_exclude_what_the_tables_show(report: Path) -> None:
    md = report.read_text()
    others = md[md.index("<summary>Every other metric that changed"):md.index("</details>")]
    assert "| tuned.exact_set |" in others and "| baseline.exact_set |" not in others  # changed / unchanged
    assert "| extra_tests.p1.tuned.exact_set |" in others
    for shown in ("tuned.top2", "tuned.top2_lo", "tuned.vs.lookup_3.top2_diff", "extra_tests.p1.tuned.top2",
                  "tuned.stall_ms_per_token", "tuned.top2_vs_oracle"):
        assert f"| {shown} |" not in others, shown
    assert "| tuned.mb_per_token |" not in others  # unchanged


def test_params_table_lists_the_changed_param_as_written(report: Path) -> None:
    md = report.read_text()
    assert table_row(md, "`tuned.lr`") == ["`tuned.lr`", "0.000536", "0.0003"]
    assert "`baseline.lr`" not in md


def test_images_exist_are_valid_pngs_and_are_linked(report: Path) -> None:
    from matplotlib.image import imread

    md = report.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(links) == IMAGES
    for link in links:
        image = report.parent / link
        assert image.read_bytes()[:8] == PNG_MAGIC, link
        height, width, _ = imread(image).shape
        assert width >= 400 and height >= 300, (link, width, height)
        assert image.stat().st_size < 200_000, link  # small enough for a PR comment


def test_change_cell_verdicts() -> None:
    from routecast.report.summary import Estimate, change_cell

    old, new = Estimate(0.30, 0.29, 0.31, 20), Estimate(0.35, 0.34, 0.36, 20)
    assert change_cell(old, new, "main") == "0.300 [0.290, 0.310] → **0.350 [0.340, 0.360]** (+5.0 pts, real)"
    # the same values over 4 sequences: disjoint, but too few sequences to trust
    few = Estimate(0.35, 0.34, 0.36, 4)
    assert change_cell(old, few, "main").endswith("(+5.0 pts, not judged: 4 test sequences in the workspace)")
    # a revision written before the intervals existed
    assert change_cell(Estimate(0.30), new, "main") == \
        "0.300 → 0.350 [0.340, 0.360] (+5.0 pts, not judged: no interval at `main`)"
    # touching intervals overlap
    assert change_cell(old, Estimate(0.32, 0.31, 0.33, 20), "main").endswith("(+2.0 pts, within noise)")
    assert change_cell(new, old, "main").endswith("**0.300 [0.290, 0.310]** (-5.0 pts, real)")
    assert change_cell(None, None, "main") == "—"


def test_estimate_reads_the_file_shape() -> None:
    from routecast.report.summary import Estimate

    assert Estimate.of(AFTER["tuned"], "top2") == Estimate(0.350, 0.335, 0.365, 20)
    assert Estimate.of(AFTER["tuned"]["vs"]["lookup_3"], "top2_diff", 20) == Estimate(0.012, 0.004, 0.020, 20)
    assert Estimate.of({"top2": 0.5}, "top2") == Estimate(0.5, None, None, 0)
    assert Estimate.of({"top2": "nan"}, "top2") is None and Estimate.of(None, "top2") is None


def test_split_line_warns_when_the_test_split_differs() -> None:
    from routecast.report.summary import split_line

    line = split_line({"tuned": {"n_test": 336, "n_test_sequences": 1}}, AFTER, "main")
    assert line == ("Test split: 20 sequences, 4,000 samples. **The test split differs** (`main`: 1 sequence, "
                    "336 samples): the two sides are scored on different samples.")
    # a revision from before the sequence count: compared by samples alone
    assert split_line({"tuned": {"n_test": 4000}}, AFTER, "main") == "Test split: 20 sequences, 4,000 samples."
    assert "(`main`: 336 samples)" in split_line({"tuned": {"n_test": 336}}, AFTER, "main")


def test_read_series_joins_dvclive_tsvs_on_step(tmp_path: Path) -> None:
    from routecast.report.summary import read_series

    live = tmp_path / "live" / "plots" / "metrics"
    write_csv(live / "a.tsv", ["step", "a"], [[1, 0.5], [0, 0.25]], delimiter="\t")
    write_csv(live / "b.tsv", ["step", "b"], [[0, 2.0], [2, "nan"]], delimiter="\t")
    frame = read_series(tmp_path, "live", ("a", "b", "missing"))
    assert frame["step"].tolist() == [0, 1, 2]
    np.testing.assert_array_equal(frame["a"].to_numpy(), [0.25, 0.5, np.nan])
    np.testing.assert_array_equal(frame["b"].to_numpy(), [2.0, np.nan, np.nan])
    assert read_series(tmp_path, "live", ("missing",)) is None


@pytest.mark.parametrize(("path", "text", "message"), [
    ("metrics/evaluate.json", "{not json", "metrics/evaluate.json (workspace): not valid JSON"),
    ("metrics/tune/live/plots/metrics/value.tsv", "trial\tvalue\n0\t0.3\n",
     "metrics/tune/live/plots/metrics/value.tsv (workspace): no column step"),
    ("metrics/evaluate/per_layer_top2.csv", "layer,predictor,top2\n0,tuned,0.5\n1,tuned,high\n",
     "metrics/evaluate/per_layer_top2.csv (workspace): line 3, column top2: 'high' is not a number"),
])
def test_bad_input_is_one_line_naming_the_file(tmp_path: Path, path: str, text: str, message: str) -> None:
    (tmp_path / "repo").mkdir()
    repo = make_repo(tmp_path / "repo")
    write_results(repo, AFTER, 0.0, seed=0)
    run([*GIT, "add", "-A"], repo)
    run([*GIT, "commit", "-qm", "results"], repo)
    (repo / path).write_text(text)
    proc = run(["routecast", "report", "--rev", "HEAD", "--out", str(tmp_path / "r.md")], repo, check=False)
    assert proc.returncode == 1
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r.md").exists()


def test_report_on_an_unknown_revision_fails_clearly(two_commit_repo: Path, tmp_path: Path) -> None:
    proc = run(["routecast", "report", "--rev", "no-such-rev", "--out", str(tmp_path / "r.md")], two_commit_repo,
               check=False)
    assert proc.returncode == 1
    assert "no-such-rev" in proc.stderr and "Traceback" not in proc.stderr


def test_ci_params_hold_out_enough_test_sequences_to_judge() -> None:
    """The pull-request report at the workflow's CI_PARAMS must be able to call a change real."""
    from ruamel.yaml import YAML

    from routecast.data.split import _held_out
    from routecast.report.summary import MIN_SEQUENCES

    yaml = YAML(typ="safe", pure=True)
    overrides = dict(re.findall(r"-S (\S+?)=(\S+)", yaml.load((ROOT / ".github/workflows/pr.yml").read_text())
                                ["env"]["CI_PARAMS"]))
    params = yaml.load((ROOT / "params.yaml").read_text())

    def value(dotted: str) -> float:
        if dotted in overrides:
            return float(overrides[dotted])
        node = params
        for key in dotted.split("."):
            node = node[key]
        return float(node)

    assert params["extract"]["source"] == "synthetic" and params["split"]["by"] == "sequence"
    sequences = int(value("extract.synthetic.num_sequences"))
    assert _held_out(sequences, value("split.test_fraction")) >= MIN_SEQUENCES


@pytest.mark.slow
def test_report_on_a_real_tiny_run(pipeline_repo: Path, tmp_path: Path) -> None:
    """The tiny pipeline's results against its first commit (which has no results yet)."""
    from routecast.report.summary import Estimate

    out = tmp_path / "report.md"
    run(["routecast", "report", "--rev", "HEAD", "--out", str(out)], pipeline_repo)
    md = out.read_text()
    evaluate = json.loads((pipeline_repo / "metrics" / "evaluate.json").read_text())
    for name, metrics in evaluate.items():
        if name in ("validation", "extra_tests"):  # blocks of the file that are not predictors
            continue
        cells = table_row(md, f"**{name}**" if name in ("baseline", "tuned") else name)
        assert cells[2] == f"— → {Estimate.of(metrics, 'top2')}", cells
        assert re.fullmatch(r"— → \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", cells[2]), cells
    prefetch = json.loads((pipeline_repo / "metrics" / "prefetch.json").read_text())
    assert table_row(section(md, "### Prefetch simulation"), "**tuned**")[1] == \
        f"— → **{prefetch['tuned']['stall_ms_per_token']:.2f}**"
    for image in IMAGES:
        assert f"({image})" in md
        assert (tmp_path / image).read_bytes()[:8] == PNG_MAGIC
