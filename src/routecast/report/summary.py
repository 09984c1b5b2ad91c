"""The review report: Markdown comparing the workspace's results with a git revision's.

`routecast report --rev main` writes reports/report.md with the headline first (metrics/headline.json,
the figures `dvc exp show` prints: routecast.report.headline), then, folded below it, the detail:
- the test metrics of every predictor (top-1, top-2, set recall), each with its 95% interval,
  revision -> workspace, a change called real only where the two intervals do not overlap;
  the tuned model's paired top-2 differences against every other predictor (a lead stated only
  where its interval excludes zero); the same for each `evaluate.extra_tests` trace. A trace
  without a primary (unweighted: top-1 and top-2 null) gets set metrics instead (set recall,
  macro F1 at top-k and at p >= 0.5) and paired set recall differences;
- the prefetch simulation (metrics/prefetch.json): stall, gap closed, speedup, hit rate per
  predictor beside the on_demand and perfect bounds;
- every other metric that changed (`dvc metrics diff --all --json --targets` the detail files) and the parameters that
  changed (`dvc params diff --json`);
- PNG plots (routecast.report.plotting) beside it, the revision's data dashed where there is some,
  and the `dvc plots` views as a page that renders offline (plots.html: routecast.report.page).
The metrics files, CSVs and DVCLive series are committed (cache: false in dvc.yaml), so the
revision's are read with `git show`.
"""

from __future__ import annotations

import io
import json
import logging
import math
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from ruamel.yaml import YAML

from routecast.evaluate.names import CONFUSION_COLUMNS, MODELS, PER_LAYER_COLUMNS, PER_LAYER_SET_COLUMNS
from routecast.pipeline.artifacts import atomic_write_text
from routecast.report import plotting
from routecast.report.headline import labels as headline_labels
from routecast.report.page import write_plots_page
from routecast.sim.names import BOUNDS, SLOTS_COLUMNS, WIDTH_COLUMNS

log = logging.getLogger(__name__)

HEADLINE_JSON = "metrics/headline.json"  # the one file dvc.yaml declares as metrics
EVALUATE_JSON = "metrics/evaluate.json"
PREFETCH_JSON = "metrics/prefetch.json"
# The detail: versioned like the headline (cache: false), diffed with `dvc metrics diff --targets`.
DETAIL_METRICS = ("metrics/features.json", "metrics/tune.json", "metrics/train/baseline/metrics.json",
                  "metrics/train/tuned/metrics.json", EVALUATE_JSON, PREFETCH_JSON)
PER_LAYER_CSV = "metrics/evaluate/per_layer_top2.csv"
CONFUSION_CSV = "metrics/evaluate/confusion_tuned.csv"
STALL_CSV = "metrics/prefetch/stall_vs_slots.csv"
HIT_RATE_CSV = "metrics/prefetch/hit_rate_vs_width.csv"
TRAIN_LIVE = "metrics/train/{model}"  # DVCLive directories; a series is <dir>/plots/metrics/<name>.tsv
TUNE_LIVE = "metrics/tune/live"
# The columns of the test metrics table: metric key in evaluate.json -> header.
HEADLINE_METRICS = {"top1": "top-1", "top2": "top-2", "set_recall": "set recall"}
# ... for a trace without a primary (unweighted: top1 and top2 null): set metrics only.
SET_METRICS = {"set_recall": "set recall", "macro_f1": "macro F1 (top-k)", "macro_f1_p50": "macro F1 (p ≥ 0.5)"}
# The tuned model's paired difference (`tuned.vs.<name>.<key>`), as the evaluate stage writes it: top-2
# where the trace has a primary, else set recall.
PAIRED_KEYS = {"top2_diff": "top-2", "set_recall_diff": "set recall"}
# The columns of the prefetch table: key in prefetch.json -> (header, format).
PREFETCH_COLUMNS = {"stall_ms_per_token": ("stall (ms/token)", "{:.2f}"), "gap_closed": ("gap closed", "{:.3f}"),
                    "speedup_vs_on_demand": ("speedup vs on_demand", "{:.3f}"), "hit_rate": ("hit rate", "{:.3f}")}
BOUND_LABELS = {"on_demand": "on_demand (bound: no prediction)", "perfect": "perfect (bound: the true experts)",
                "belady": "belady (bound: clairvoyant retention)",
                "clairvoyant": "clairvoyant (bound: true experts and retention)",
                "compute_floor": "compute_floor (bound: every expert resident)"}
# Fewer test sequences than this and a side's intervals are not used to judge a change: a
# bootstrap over n sequences is too narrow for small n (its variance is (n-1)/n of the usual
# estimate, and with one sequence every resample is that sequence: a zero-width interval).
MIN_SEQUENCES = 10


class ReportError(RuntimeError):
    """A command the report needs failed (not a git repository, unknown revision, dvc error), or
    a file it reads is unreadable (the message names the file and the revision)."""


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


def read_text(repo: Path, path: str, rev: str | None = None) -> str | None:
    """`path` (relative to `repo`) in the workspace (rev None) or at a git revision; None where absent."""
    if rev is None:
        full = repo / path
        return full.read_text() if full.exists() else None
    proc = subprocess.run(["git", "show", f"{rev}:./{path}"], cwd=repo, capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def where(path: str, rev: str | None) -> str:
    return f"{path} ({'workspace' if rev is None else 'at ' + rev})"


def read_json(repo: Path, path: str, rev: str | None = None) -> dict[str, Any]:
    """A metrics file as a dict; empty where it is absent."""
    text = read_text(repo, path, rev)
    if text is None:
        return {}
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ReportError(f"{where(path, rev)}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ReportError(f"{where(path, rev)}: expected a JSON object, got {type(data).__name__}")
    return data


def read_csv(repo: Path, path: str, columns: list[str], rev: str | None = None, sep: str = ",") -> pd.DataFrame | None:
    """A CSV (or DVCLive's TSV) with at least `columns`, numbers in all of them but `predictor`
    (empty or `nan` cells are NaN); None where it is absent."""
    text = read_text(repo, path, rev)
    if text is None:
        return None
    try:
        frame = pd.read_csv(io.StringIO(text), sep=sep)
    except (ValueError, pd.errors.ParserError) as exc:  # EmptyDataError is a ValueError
        raise ReportError(f"{where(path, rev)}: unreadable: {exc}") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ReportError(f"{where(path, rev)}: no column {', '.join(missing)} (has {', '.join(frame.columns)})")
    for column in (c for c in columns if c != "predictor"):
        numbers = pd.to_numeric(frame[column], errors="coerce")
        bad = frame[column][numbers.isna() & frame[column].notna()]
        if len(bad):  # the header is line 1
            raise ReportError(f"{where(path, rev)}: line {bad.index[0] + 2}, column {column}: "
                              f"{bad.iloc[0]!r} is not a number")
        frame[column] = numbers
    return frame


def read_series(repo: Path, live_dir: str, names: tuple[str, ...], rev: str | None = None) -> pd.DataFrame | None:
    """The DVCLive series `names` of `live_dir` joined on `step`; None where none exists."""
    frames = [frame[["step", name]] for name in names
              if (frame := read_csv(repo, f"{live_dir}/plots/metrics/{name}.tsv", ["step", name], rev, sep="\t"))
              is not None]
    if not frames:
        return None
    joined = frames[0]
    for frame in frames[1:]:
        joined = joined.merge(frame, on="step", how="outer")
    return joined.sort_values("step").reset_index(drop=True)


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'s' * (n != 1)}"


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Estimate:
    """A metric with its 95% interval (None where the file has none), over `sequences` test sequences."""

    value: float
    lo: float | None = None
    hi: float | None = None
    sequences: int = 0

    @classmethod
    def of(cls, entry: Mapping[str, Any] | None, key: str, sequences: Any = None) -> Estimate | None:
        """`entry[key]` with `key_lo`/`key_hi`; the sequence count from the entry's `n_test_sequences`
        unless given (the paired differences sit one level below it)."""
        if not isinstance(entry, Mapping) or not is_number(entry.get(key)):
            return None
        lo, hi = entry.get(f"{key}_lo"), entry.get(f"{key}_hi")
        n = entry.get("n_test_sequences") if sequences is None else sequences
        interval = is_number(lo) and is_number(hi)
        return cls(float(entry[key]), float(lo) if interval else None, float(hi) if interval else None,
                   int(n) if is_number(n) else 0)

    def __str__(self) -> str:
        return f"{self.value:.3f}" + ("" if self.lo is None else f" [{self.lo:.3f}, {self.hi:.3f}]")

    def not_judged(self, side: str) -> str | None:
        """Why this estimate cannot judge a change (None: it can)."""
        if self.lo is None:
            return f"not judged: no interval {side}"
        if self.sequences < MIN_SEQUENCES:
            return f"not judged: {plural(self.sequences, 'test sequence')} {side}"
        return None


def change_cell(old: Estimate | None, new: Estimate | None, rev_label: str) -> str:
    """`old → new (change in points, verdict)`; the new value bold where the change is real (the
    intervals do not overlap); `new (=)` where both print the same."""
    if old is None or new is None:
        return "—" if old is None and new is None else f"{old or '—'} → {new or '—'}"
    if str(old) == str(new):
        return f"{new} (=)"
    verdict = (old.not_judged(f"at `{rev_label}`") or new.not_judged("in the workspace")
               or ("real" if old.hi < new.lo or new.hi < old.lo else "within noise"))
    shown = f"**{new}**" if verdict == "real" else str(new)
    return f"{old} → {shown} ({100 * (new.value - old.value):+.1f} pts, {verdict})"


def paired(diff: Estimate) -> tuple[str, str]:
    """(the difference in points with its interval, the verdict: `ahead`, `behind`, `within noise`
    or why it is not judged)."""
    span = f"{100 * diff.value:+.1f} points"
    if diff.lo is None:
        return span, "not judged: no interval"
    span += f" [{100 * diff.lo:.1f}, {100 * diff.hi:.1f}]"
    why = diff.not_judged("")
    if why:
        return span, why.rstrip()
    return span, "ahead" if diff.lo > 0 else "behind" if diff.hi < 0 else "within noise"


def paired_sentence(name: str, diff: Estimate) -> str:
    """`tuned beats lookup_3 by +1.2 points [0.4, 2.0]` only where the interval excludes zero."""
    span, verdict = paired(diff)
    if verdict == "ahead":
        return f"tuned beats {name} by {span}"
    if verdict == "behind":
        return f"tuned trails {name} by {span}"
    return f"tuned vs {name}: {span}, {verdict}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":-:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def entries(old: Mapping[str, Any], new: Mapping[str, Any], having: str, first: tuple[str, ...]) -> list[str]:
    """The names of the blocks (dicts holding `having`) of either side: `first`, then the workspace's
    order, then those only the revision has."""
    names = dict.fromkeys([*first, *new, *old])
    return [n for n in names if any(isinstance(s.get(n), Mapping) and having in s[n] for s in (old, new))]


def split_of(metrics: Mapping[str, Any]) -> tuple[int | None, int] | None:
    """(test sequences, None where the file predates the count; test samples) of an evaluate.json block."""
    for entry in metrics.values():
        if isinstance(entry, Mapping) and is_number(entry.get("n_test")):
            sequences = entry.get("n_test_sequences")
            return int(sequences) if is_number(sequences) else None, int(entry["n_test"])
    return None


def describe(split: tuple[int | None, int]) -> str:
    sequences, samples = split
    return ("" if sequences is None else f"{plural(sequences, 'sequence')}, ") + plural(samples, "sample")


def split_line(old: Mapping[str, Any], new: Mapping[str, Any], rev_label: str) -> str:
    before, after = split_of(old), split_of(new)
    line = f"Test split: {'?' if after is None else describe(after)}."
    if before is not None and after is not None and (
            before[1] != after[1] or None not in (before[0], after[0]) and before[0] != after[0]):
        line += (f" **The test split differs** (`{rev_label}`: {describe(before)}): the two sides are scored "
                 "on different samples.")
    if after is not None and after[0] is not None and after[0] < MIN_SEQUENCES:
        line += (f" **Only {plural(after[0], 'test sequence')}**: a bootstrap over fewer than "
                 f"{MIN_SEQUENCES} is too narrow to trust, so no change is judged (more sequences, or a larger "
                 "`split.test_fraction`, make the intervals usable).")
    return line


def has_primary(side: Mapping[str, Any]) -> bool:
    """Whether an evaluate.json block has a number for top-2 anywhere (unweighted traces have null)."""
    return any(isinstance(entry, Mapping) and is_number(entry.get("top2")) for entry in side.values())


def headline(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, str]:
    """The table's columns: top-1, top-2, set recall where the workspace's trace has a primary
    (or, with no workspace block, the revision's); set metrics where it has none."""
    side = new if entries({}, new, "set_recall", ()) else old
    return HEADLINE_METRICS if has_primary(side) or not entries({}, side, "set_recall", ()) else SET_METRICS


def metric_cell(old: Mapping[str, Any], new: Mapping[str, Any], predictor: str, metric: str, rev_label: str) -> str:
    """The change cell of one predictor's metric in two evaluate.json blocks."""
    return change_cell(Estimate.of(old.get(predictor), metric), Estimate.of(new.get(predictor), metric), rev_label)


def tuned_vs(side: Mapping[str, Any]) -> tuple[Mapping[str, Any], Any]:
    """The tuned model's paired differences (`tuned.vs`) and its test sequence count."""
    tuned = side.get("tuned") if isinstance(side.get("tuned"), Mapping) else {}
    return tuned.get("vs") if isinstance(tuned.get("vs"), Mapping) else {}, tuned.get("n_test_sequences")


def paired_key(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """The paired difference the bullets show: the workspace's (`top2_diff`, or `set_recall_diff` for
    a trace without a primary), else the revision's."""
    for side in (new, old):
        vs, _ = tuned_vs(side)
        for key in PAIRED_KEYS:
            if entries({}, vs, key, ()):
                return key
    return "top2_diff"


def paired_bullets(old: Mapping[str, Any], new: Mapping[str, Any], rev_label: str, key: str = "top2_diff"
                   ) -> list[str]:
    """One line per predictor the tuned model is compared with: the workspace's sentence, and the
    revision's difference where it printed otherwise (`key`: the difference, PAIRED_KEYS)."""
    (vs_old, n_old), (vs_new, n_new) = tuned_vs(old), tuned_vs(new)
    bullets = []
    for name in entries(vs_old, vs_new, key, ()):
        before = Estimate.of(vs_old.get(name), key, n_old)
        after = Estimate.of(vs_new.get(name), key, n_new)
        if after is None:
            bullets.append(f"- at `{rev_label}` only: {paired_sentence(name, before)}")
        elif before is None:
            bullets.append(f"- {paired_sentence(name, after)} (none at `{rev_label}`)")
        elif str(before) != str(after):
            bullets.append(f"- {paired_sentence(name, after)} (at `{rev_label}`: {', '.join(paired(before))})")
        else:
            bullets.append(f"- {paired_sentence(name, after)}")
    return bullets


def evaluate_block(old: Mapping[str, Any], new: Mapping[str, Any], rev_label: str) -> list[str]:
    """The metrics table, the tuned model's paired differences and the models' share of the oracle."""
    columns = headline(old, new)
    rows = [[f"**{p}**" if p in MODELS else p, *(metric_cell(old, new, p, m, rev_label) for m in columns)]
            for p in entries(old, new, "set_recall", MODELS)]
    parts = [split_line(old, new, rev_label), ""]
    if columns is SET_METRICS:
        parts += ["No top-1 or top-2: the trace has no primary expert (its sets are unordered), so only set "
                  "metrics apply.", ""]
    parts.append(table(["predictor", *columns.values()], rows))
    key = paired_key(old, new)
    if bullets := paired_bullets(old, new, rev_label, key):
        parts += ["", f"The tuned model's test {PAIRED_KEYS[key]} against each other predictor, paired (the same "
                  "resampled sequences on both sides), workspace; a lead is stated only where its 95% interval "
                  "excludes zero:", "", *bullets]
    shares = [f"**{m}** {metric_cell(old, new, m, 'top2_vs_oracle', rev_label)}"
              for m in entries(old, new, "top2_vs_oracle", MODELS) if m in MODELS
              and (Estimate.of(old.get(m), "top2_vs_oracle") or Estimate.of(new.get(m), "top2_vs_oracle"))]
    if shares:
        parts += ["", "Top-2 as a share of the oracle's (synthetic traces): " + "; ".join(shares) + "."]
    return parts


def metrics_section(old: Mapping[str, Any], new: Mapping[str, Any], rev_label: str) -> str:
    if not entries(old, new, "set_recall", MODELS):
        return f"No `{EVALUATE_JSON}` in the workspace or at `{rev_label}`: run `dvc repro` first."
    return "\n".join([
        f"Each cell: `{rev_label}` → workspace (change in points, verdict); [lo, hi] is the 95% interval from a "
        "bootstrap over test sequences. A change is called **real** only where the two intervals do not overlap "
        "(a conservative test: a smaller real change reads as within noise).", "",
        *evaluate_block(old, new, rev_label)])


def extra_tests_section(old: Mapping[str, Any], new: Mapping[str, Any], rev_label: str) -> str | None:
    before, after = old.get("extra_tests") or {}, new.get("extra_tests") or {}
    if not before and not after:
        return None
    parts = ["Traces never trained on (`evaluate.extra_tests`), encoded with the training trace's feature "
             "settings and scored by every predictor; cells as above."]
    for name in dict.fromkeys([*after, *before]):
        parts += ["", f"#### `{name}`", "", *evaluate_block(before.get(name) or {}, after.get(name) or {}, rev_label)]
    return "\n".join(parts)


def number_cell(old: Any, new: Any, spec: str) -> str:
    """`old → **new** (change to 3 significant digits)`; `new (=)` where both print the same."""
    def show(value: Any) -> str:
        return "—" if value is None else spec.format(value) if is_number(value) else str(value)

    if show(old) == show(new):
        return f"{show(new)} (=)"
    if is_number(old) and is_number(new):
        return f"{show(old)} → **{show(new)}** ({new - old:+.3g})"
    return f"{show(old)} → **{show(new)}**"


def prefetch_section(old: Mapping[str, Any], new: Mapping[str, Any], rev_label: str, preset: Any) -> str | None:
    names = entries(old, new, "stall_ms_per_token", (*BOUNDS, *MODELS))
    if not names:
        return None
    rows = [[BOUND_LABELS.get(p, f"**{p}**" if p in MODELS else p),
             *(number_cell((old.get(p) or {}).get(k), (new.get(p) or {}).get(k), spec)
               for k, (_, spec) in PREFETCH_COLUMNS.items())] for p in names]
    engine, replay = new.get("engine") or {}, new.get("replay") or {}
    described = ""
    if is_number(engine.get("expert_mb")):
        described = (f" Engine{f' (preset `{preset}`)' if preset else ''}: one expert {engine['expert_mb']:.1f} MB, "
                     f"{engine.get('transfer_ms', float('nan')):.2f} ms over the link; "
                     f"{engine.get('compute_ms_per_layer', float('nan')):.2f} ms compute per layer; "
                     f"{engine.get('slots_per_layer')} cache slots per layer; prefetch width {engine.get('width')}.")
    if is_number(replay.get("tokens")):
        sequences = plural(int(replay.get("sequences") or 0), "test sequence")
        described += f" Replay: {sequences}, {replay['tokens']:,} tokens."
    return "\n".join([
        f"What each predictor buys an expert-offloading engine (`{PREFETCH_JSON}`, docs/prefetch.md).{described} "
        f"Each cell: `{rev_label}` → workspace (change). Gap closed: 0 = on_demand, 1 = perfect, negative = worse "
        "than no prediction (— where there is no gap to close). One deterministic replay of the predictors' "
        "rankings: no interval; whether one predictor is really better is for the accuracy table to say.", "",
        table(["predictor", *(header for header, _ in PREFETCH_COLUMNS.values())], rows)])


# The headline table's rows: key in headline.json -> label ({metric}, {reference}: from evaluate.json).
HEADLINE_ROWS = {"base": "baseline, test {metric} (%)", "tuned": "tuned, test {metric} (%)",
                 "±": "± of both (95% interval, points)", "kind": "tuned kind",
                 "oracle": "tuned as % of the exact oracle",
                 "gain": "tuned − {reference} (best reference), paired, points",
                 "gain±": "± of the gain (95% interval, points)", "speedup": "prefetch speedup over no prediction (x)"}
METRIC_NAMES = {"top2": "top-2", "set_recall": "set recall"}


def headline_section(old: Mapping[str, Any], new: Mapping[str, Any], old_labels: Mapping[str, Any],
                     new_labels: Mapping[str, Any], rev_label: str) -> str:
    """The headline table: each figure at the revision, in the workspace, and the change."""
    def fmt(value: Any) -> str:
        return "—" if value is None else str(value)  # as the file holds it (rounded for the screen)

    def label(key: str) -> str:
        text = HEADLINE_ROWS.get(key, key)
        metric, reference = new_labels.get("metric"), new_labels.get("reference")
        text = text.format(metric=METRIC_NAMES.get(metric, metric), reference=reference or "the best reference")
        if key == "gain" and old and old_labels.get("reference") not in (None, reference):
            text += f" (at `{rev_label}`: {old_labels['reference']})"
        return text

    rows = []
    for key in dict.fromkeys([*HEADLINE_ROWS, *new, *old]):
        if key not in new and key not in old:
            continue
        a, b = old.get(key), new.get(key)
        change = (f"{b - a:+.3g}" if is_number(a) and is_number(b) and a != b
                  else "=" if a == b else "changed" if a is not None and b is not None else "")
        rows.append([label(key), fmt(a), fmt(b), change])
    return table(["", f"`{rev_label}`", "workspace", "change"], rows)


def shown_elsewhere(path: str, key: str, metrics: tuple[str, ...] = tuple(HEADLINE_METRICS)) -> bool:
    """Whether a `dvc metrics diff` key is one the sections above render (`metrics`: the test
    metrics table's columns)."""
    parts = key.split(".")  # names are identifiers (params.py checks extra test names), so "." splits
    if path == EVALUATE_JSON:
        rest = parts[3:] if parts[0] == "extra_tests" else parts[1:]
        if not rest:
            return False
        base = rest[0].removesuffix("_lo").removesuffix("_hi")
        return rest[0] == "vs" or base in (*metrics, "top2_vs_oracle", "n_test", "n_test_sequences")
    return path == PREFETCH_JSON and len(parts) == 2 and parts[1] in PREFETCH_COLUMNS


def others_section(metrics_diff: Mapping[str, Mapping[str, Any]], rev_label: str,
                   metrics: tuple[str, ...] = tuple(HEADLINE_METRICS)) -> str:
    def fmt(value: Any) -> str:
        if isinstance(value, float) and is_number(value):
            return f"{value:.4g}"
        return "—" if value is None else str(value)

    rows = [[f"`{path}`", key, fmt(entry.get("old")), fmt(entry.get("new")),
             f"{entry['diff']:+.4g}" if is_number(entry.get("diff")) else ""]
            for path, found in sorted(metrics_diff.items()) for key, entry in sorted(found.items())
            if entry.get("old") != entry.get("new") and not shown_elsewhere(path, key, metrics)]
    if not rows:
        return ""
    return "\n".join([f"<details><summary>Every other metric that changed ({len(rows)})</summary>", "",
                      table(["file", "metric", rev_label, "workspace", "change"], rows), "", "</details>"])


def params_section(params_diff: Mapping[str, Mapping[str, Any]], rev_label: str) -> str:
    # Parameters print as written (an lr of 3e-4 must not round to 0.0003 or 0.0).
    rows = [[f"`{key}`", "—" if entry.get("old") is None else str(entry["old"]),
             "—" if entry.get("new") is None else str(entry["new"])]
            for path, found in params_diff.items() for key, entry in found.items()]
    if not rows:
        return f"No parameter differs from `{rev_label}`."
    return table(["parameter", rev_label, "workspace"], rows)


def param(repo: Path, dotted: str) -> Any:
    """A value of the workspace's params.yaml, or None."""
    try:
        node = YAML(typ="safe", pure=True).load((repo / "params.yaml").read_text())
        for key in dotted.split("."):
            node = node[key]
        return node
    except (OSError, KeyError, TypeError, ValueError):
        return None


def make_plots(repo: Path, rev: str, out_dir: Path, labels: tuple[str, str]) -> list[tuple[str, Path, str]]:
    """(title, png, caption) for each plot whose workspace data exists."""
    plots: list[tuple[str, Path, str]] = []
    dashed = f"dashed: `{labels[1]}`"
    changed_only = f"{dashed}, drawn only for predictors whose line changed"

    def add(title: str, name: str, figure: Any, caption: str) -> None:
        plots.append((title, plotting.save(figure, out_dir / f"{name}.png"), caption))

    series = tuple(column for column, _, _ in plotting.TRAINING_PANELS)

    def runs(rev_: str | None) -> dict[str, pd.DataFrame]:
        return {m: s for m in MODELS if (s := read_series(repo, TRAIN_LIVE.format(model=m), series, rev_)) is not None}

    if now := runs(None):
        add("Training curves", "training_curves", plotting.training_curves(now, runs(rev), labels),
            f"Loss, validation top-2 and set recall per epoch of both models (DVCLive); solid: workspace, {dashed}.")

    # A long-format CSV's plot reads its first three columns (x, predictor, y): only those must exist.
    def both(path: str, columns: tuple[str, ...]) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
        return read_csv(repo, path, list(columns[:3])), read_csv(repo, path, list(columns[:3]), rev)

    # The per-layer CSV holds top-2, or set recall for a trace without a primary: its third column says.
    def per_layer_csv(rev_: str | None) -> pd.DataFrame | None:
        frame = read_csv(repo, PER_LAYER_CSV, list(PER_LAYER_COLUMNS[:2]), rev_)
        if frame is None:
            return None
        unweighted = PER_LAYER_SET_COLUMNS[2] in frame.columns and PER_LAYER_COLUMNS[2] not in frame.columns
        return read_csv(repo, PER_LAYER_CSV, list(PER_LAYER_SET_COLUMNS if unweighted else PER_LAYER_COLUMNS), rev_)

    if (per_layer := per_layer_csv(None)) is not None:
        metric = plotting.per_layer_metric(per_layer)
        per_layer_old = per_layer_csv(rev)
        if per_layer_old is not None and plotting.per_layer_metric(per_layer_old) != metric:
            per_layer_old = None  # the revision's trace had (or lacked) a primary: another metric
        add(f"Test {'top-2' if metric == 'top2' else 'set recall'} per layer", f"per_layer_{metric}",
            plotting.per_layer_top2(per_layer, per_layer_old, labels, (param(repo, "features.horizons") or [None])[0]),
            f"Every predictor on the test split; thick: the two models; {changed_only}.")
    pairs = read_csv(repo, CONFUSION_CSV, list(CONFUSION_COLUMNS))
    if pairs is not None and len(pairs):  # header only for a trace without a primary
        add("Confusion matrix (tuned model)", "confusion_tuned", plotting.confusion_matrix(pairs),
            "Top-1 prediction against the actual primary expert, each row normalised to 1; workspace only.")
    if (history := read_series(repo, TUNE_LIVE, plotting.TUNE_SERIES)) is not None:
        add("Tune history", "tune_history",
            plotting.tune_history(history, read_series(repo, TUNE_LIVE, plotting.TUNE_SERIES, rev), labels),
            f"The validation objective of each Optuna trial and the best so far (DVCLive); {dashed}.")
    stall, stall_old = both(STALL_CSV, SLOTS_COLUMNS)
    if stall is not None:
        add("Prefetch: stall against cache slots", "prefetch_stall", plotting.prefetch_stall(stall, stall_old, labels),
            f"Stall per token at each cache size, at the configured prefetch width; thick: the models and the "
            f"bounds (on_demand, perfect); {changed_only}.")
    hits, hits_old = both(HIT_RATE_CSV, WIDTH_COLUMNS)
    if hits is not None:
        add("Prefetch: hit rate against width", "prefetch_hit_rate", plotting.prefetch_hit_rate(hits, hits_old, labels),
            f"Hit rate at each prefetch width, at the configured cache slots; {changed_only}.")
    return plots


def build_report(rev: str, out: str | Path = "reports/report.md", repo: str | Path = ".",
                 rev_label: str | None = None, note: str | None = None) -> Report:
    """Write the Markdown report comparing the workspace of `repo` with `rev`, PNGs beside it."""
    repo, out = Path(repo).resolve(), Path(out)
    out = out if out.is_absolute() else Path.cwd() / out
    sha = _command(["git", "rev-parse", "--short", f"{rev}^{{commit}}"], repo).strip()
    label = rev_label or rev
    evaluate_old, evaluate_new = read_json(repo, EVALUATE_JSON, rev), read_json(repo, EVALUATE_JSON)
    metrics_diff = dvc_json(["metrics", "diff", rev, "--all", "--targets", *DETAIL_METRICS], repo)
    params_diff = dvc_json(["params", "diff", rev], repo)
    out.parent.mkdir(parents=True, exist_ok=True)
    plots = make_plots(repo, rev, out.parent, ("workspace", label))
    page = write_plots_page(repo, out.parent / "plots.html", rev)
    lines = [f"## routecast: workspace vs `{label}` (`{sha}`)", ""]
    if note:
        lines += [note, ""]
    headline_old, headline_new = read_json(repo, HEADLINE_JSON, rev), read_json(repo, HEADLINE_JSON)
    if headline_new or headline_old:
        lines += [headline_section(headline_old, headline_new, headline_labels(evaluate_old),
                                   headline_labels(evaluate_new), label), ""]
    else:
        lines += [f"No `{HEADLINE_JSON}` in the workspace or at `{label}`: run `dvc repro` first.", ""]
    if Estimate.of(evaluate_new.get("tuned"), "top2") is not None:
        lines += [f"Tuned model, test top-2: {metric_cell(evaluate_old, evaluate_new, 'tuned', 'top2', label)}", ""]
    elif Estimate.of(evaluate_new.get("tuned"), "set_recall") is not None:  # no primary: set recall instead
        lines += [f"Tuned model, test set recall: "
                  f"{metric_cell(evaluate_old, evaluate_new, 'tuned', 'set_recall', label)}", ""]
    # The detail, folded: GitHub renders Markdown inside <details> when blank lines surround it.
    lines += ["<details><summary>Detail: every predictor, cross-trace tests, prefetch simulation, other "
              "metrics, parameters, plots</summary>", ""]
    lines += ["### Test metrics", "", metrics_section(evaluate_old, evaluate_new, label), ""]
    if extra := extra_tests_section(evaluate_old, evaluate_new, label):
        lines += ["### Cross-trace tests", "", extra, ""]
    prefetch = prefetch_section(read_json(repo, PREFETCH_JSON, rev), read_json(repo, PREFETCH_JSON), label,
                                param(repo, "simulate.preset"))
    if prefetch:
        lines += ["### Prefetch simulation", "", prefetch, ""]
    shown = (*HEADLINE_METRICS, *headline(evaluate_old, evaluate_new))
    if others := others_section(metrics_diff, label, shown):
        lines += ["### Other metrics", "", others, ""]
    lines += ["### Parameters", "", params_section(params_diff, label), "", "### Plots", ""]
    if not plots:
        lines += ["No plot data in the workspace: run `dvc repro` first.", ""]
    for title, path, caption in plots:
        lines += [f"#### {title}", "", f"![{title}]({path.relative_to(out.parent).as_posix()})", "", caption, ""]
    lines += ["</details>", "",
              f"<sub>Made by `routecast report --rev {rev}`; every `dvc plots diff {rev}` view, offline: "
              f"[{page.name}]({page.relative_to(out.parent).as_posix()}) beside this report (in CI: the "
              "`routecast-report` artifact).</sub>", ""]
    atomic_write_text(out, "\n".join(lines))
    log.info("report: wrote %s and %d plots", out, len(plots))
    return Report(out, [path for _, path, _ in plots])
