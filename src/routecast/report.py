"""The review report: Markdown comparing the workspace's results with a git revision's.

`routecast report --rev main` writes reports/report.md with
- the test metrics of every predictor (top-1, top-2, set recall), revision -> workspace, from
  `dvc metrics diff --all --json`, and every other metric that changed;
- the parameters that changed, from `dvc params diff --json`;
- PNG plots (routecast.plotting) beside it: training curves, per-layer top-2, the tuned model's
  confusion matrix and the tune history, the revision's data dashed where there is some.
The revision's CSVs are read with `git show`, since the plotted files are committed (cache: false).
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from ruamel.yaml import YAML

from routecast import plotting
from routecast.artifacts import atomic_write_text

log = logging.getLogger(__name__)

EVALUATE_JSON = "metrics/evaluate.json"
TRAIN_CSV = "metrics/train/{model}.csv"
PER_LAYER_CSV = "metrics/evaluate/per_layer_top2.csv"
CONFUSION_CSV = "metrics/evaluate/confusion_tuned.csv"
TUNE_HISTORY_CSV = "metrics/tune/history.csv"
MODELS = ("baseline", "tuned")
# The columns of the main table: metric key in evaluate.json -> header.
HEADLINE_METRICS = {"top1": "top-1", "top2": "top-2", "set_recall": "set recall"}
UNCHANGED = 5e-5  # a difference below this prints as unchanged at 4 decimals


class ReportError(RuntimeError):
    """A command the report needs failed (not a git repository, unknown revision, dvc error)."""


@dataclass
class Report:
    markdown: Path
    images: list[Path] = field(default_factory=list)


def _command(args: list[str], repo: Path) -> str:
    proc = subprocess.run(args, cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ReportError(f"`{' '.join(args)}` exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def dvc_json(args: list[str], repo: Path) -> dict[str, Any]:
    """Run `dvc <args> --json` with this interpreter's dvc and parse its output."""
    out = _command([sys.executable, "-m", "dvc", *args, "--json"], repo).strip()
    return json.loads(out) if out else {}


def git_show(repo: Path, rev: str, path: str) -> str | None:
    """The text of `path` (relative to `repo`) at `rev`, or None where it does not exist there."""
    proc = subprocess.run(["git", "show", f"{rev}:./{path}"], cwd=repo, capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def read_csv(repo: Path, path: str, rev: str | None = None) -> pd.DataFrame | None:
    """A CSV from the workspace (rev None) or from a git revision; None where it is absent."""
    if rev is None:
        full = repo / path
        return pd.read_csv(full) if full.exists() else None
    text = git_show(repo, rev, path)
    return pd.read_csv(io.StringIO(text)) if text else None


def fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def change_cell(old: Any, new: Any) -> str:
    """`old → new (±diff)`, or just the value when it did not change."""
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (old, new))
    if numeric and abs(new - old) < UNCHANGED or old == new:
        return f"{fmt(new)} (=)"
    if numeric:
        return f"{fmt(old)} → **{fmt(new)}** ({new - old:+.4f})"
    return f"{fmt(old)} → **{fmt(new)}**"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":-:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def split_evaluate(diff: dict[str, dict[str, Any]], order: list[str] | None = None
                   ) -> dict[str, dict[str, dict[str, Any]]]:
    """{"tuned.top2": {...}} -> {"tuned": {"top2": {...}}}: the models first, then `order`
    (the workspace file's), then any predictor only the revision has."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for key, entry in diff.items():
        predictor, _, metric = key.partition(".")
        out.setdefault(predictor, {})[metric] = entry
    ranked = [*MODELS, *(order or []), *out]
    return {p: out[p] for p in dict.fromkeys(ranked) if p in out}


def metrics_section(metrics_diff: dict[str, dict[str, Any]], rev_label: str, order: list[str] | None = None) -> str:
    evaluate = split_evaluate(metrics_diff.get(EVALUATE_JSON, {}), order)
    if not evaluate:
        return f"No `{EVALUATE_JSON}` in the workspace or at `{rev_label}`: run `dvc repro` first."
    rows = [[f"**{p}**" if p in MODELS else p,
             *(change_cell(evaluate[p].get(m, {}).get("old"), evaluate[p].get(m, {}).get("new"))
               for m in HEADLINE_METRICS)] for p in evaluate]
    n_test = {e.get("n_test", {}).get("new") for e in evaluate.values()} - {None}
    parts = [f"Test split ({', '.join(map(str, sorted(n_test))) or '?'} samples); each cell: "
             f"`{rev_label}` → workspace (change). Accuracies are fractions of the test samples.", "",
             table(["predictor", *HEADLINE_METRICS.values()], rows)]
    others = [[f"`{path}`", key, fmt(entry.get("old")), fmt(entry.get("new")),
               f"{entry['diff']:+.4g}" if isinstance(entry.get("diff"), (int, float)) else ""]
              for path, entries in metrics_diff.items() for key, entry in entries.items()
              if entry.get("old") != entry.get("new")
              and not (path == EVALUATE_JSON and key.partition(".")[2] in HEADLINE_METRICS)]
    if others:
        parts += ["", f"<details><summary>Every other metric that changed ({len(others)})</summary>", "",
                  table(["file", "metric", rev_label, "workspace", "change"], others), "", "</details>"]
    return "\n".join(parts)


def params_section(params_diff: dict[str, dict[str, Any]], rev_label: str) -> str:
    # Parameters print as written (an lr of 3e-4 must not round to 0.0003 or 0.0).
    rows = [[f"`{key}`", "—" if entry.get("old") is None else str(entry["old"]),
             "—" if entry.get("new") is None else str(entry["new"])]
            for path, entries in params_diff.items() for key, entry in entries.items()]
    if not rows:
        return f"No parameter differs from `{rev_label}`."
    return table(["parameter", rev_label, "workspace"], rows)


def headline(metrics_diff: dict[str, dict[str, Any]]) -> str:
    tuned = split_evaluate(metrics_diff.get(EVALUATE_JSON, {})).get("tuned", {})
    if "top2" not in tuned:
        return ""
    return f"Tuned model, test top-2: {change_cell(tuned['top2'].get('old'), tuned['top2'].get('new'))}"


def predictor_order(repo: Path) -> list[str]:
    try:
        return list(json.loads((repo / EVALUATE_JSON).read_text()))
    except (OSError, ValueError):
        return []


def lookahead_of(repo: Path) -> int | None:
    try:
        return int(YAML(typ="safe", pure=True).load((repo / "params.yaml").read_text())["features"]["lookahead"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def make_plots(repo: Path, rev: str, out_dir: Path, labels: tuple[str, str]) -> list[tuple[str, Path, str]]:
    """(title, png, caption) for each plot whose workspace data exists."""
    plots: list[tuple[str, Path, str]] = []
    dashed = f"dashed: `{labels[1]}`"
    runs = {m: f for m in MODELS if (f := read_csv(repo, TRAIN_CSV.format(model=m))) is not None}
    if runs:
        old = {m: f for m in MODELS if (f := read_csv(repo, TRAIN_CSV.format(model=m), rev)) is not None}
        plots.append(("Training curves", plotting.training_curves(runs, out_dir / "training_curves.png", old, labels),
                      f"Loss and validation accuracy per epoch of both models; solid: workspace, {dashed}."))
    if (per_layer := read_csv(repo, PER_LAYER_CSV)) is not None:
        path = plotting.per_layer_top2(per_layer, out_dir / "per_layer_top2.png", read_csv(repo, PER_LAYER_CSV, rev),
                                       labels, lookahead_of(repo))
        plots.append(("Test top-2 per layer", path, "Every predictor on the test split; thick: the two models; "
                      f"{dashed}, drawn only for predictors whose line changed."))
    if (pairs := read_csv(repo, CONFUSION_CSV)) is not None:
        plots.append(("Confusion matrix (tuned model)", plotting.confusion_matrix(pairs, out_dir / "confusion_tuned.png"),
                      "Top-1 prediction against the actual primary expert, each row normalised to 1; workspace only."))
    if (history := read_csv(repo, TUNE_HISTORY_CSV)) is not None:
        path = plotting.tune_history(history, out_dir / "tune_history.png", read_csv(repo, TUNE_HISTORY_CSV, rev), labels)
        plots.append(("Tune history", path, f"Validation top-2 of each Optuna trial and the best so far; {dashed}."))
    return plots


def build_report(rev: str, out: str | Path = "reports/report.md", repo: str | Path = ".",
                 rev_label: str | None = None, note: str | None = None) -> Report:
    """Write the Markdown report comparing the workspace of `repo` with `rev`, PNGs beside it."""
    repo, out = Path(repo).resolve(), Path(out)
    out = out if out.is_absolute() else Path.cwd() / out
    sha = _command(["git", "rev-parse", "--short", f"{rev}^{{commit}}"], repo).strip()
    label = rev_label or rev
    metrics_diff = dvc_json(["metrics", "diff", rev, "--all"], repo)
    params_diff = dvc_json(["params", "diff", rev], repo)
    out.parent.mkdir(parents=True, exist_ok=True)
    plots = make_plots(repo, rev, out.parent, ("workspace", label))
    lines = [f"## routecast: workspace vs `{label}` (`{sha}`)", ""]
    if note:
        lines += [note, ""]
    if line := headline(metrics_diff):
        lines += [line, ""]
    lines += ["### Test metrics", "", metrics_section(metrics_diff, label, predictor_order(repo)), "",
              "### Parameters", "", params_section(params_diff, label), "", "### Plots", ""]
    if not plots:
        lines += ["No plot data in the workspace: run `dvc repro` first.", ""]
    for title, path, caption in plots:
        lines += [f"#### {title}", "", f"![{title}]({path.relative_to(out.parent).as_posix()})", "", caption, ""]
    lines += ["<sub>Made by `routecast report --rev " + rev + "`; interactive versions: "
              f"`dvc plots diff {rev}`.</sub>", ""]
    atomic_write_text(out, "\n".join(lines))
    log.info("report: wrote %s and %d plots", out, len(plots))
    return Report(out, [path for _, path, _ in plots])
