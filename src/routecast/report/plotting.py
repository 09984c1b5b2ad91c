"""Static PNG plots of the pipeline's results for the review report (`routecast report`).

The interactive views live in dvc.yaml (`dvc plots show`); these are the same plots as images a
pull-request comment can hold. Each function draws the workspace's data, and a git revision's
data dashed beside it when given, and returns the figure (so a test can read its lines);
`save` writes it as a PNG. A revision's line is labelled `_<name> (<revision>)`: the leading
underscore keeps it out of the legend, where the line style already says which revision it is.
Figures are built without pyplot, so importing this module changes no global matplotlib state.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, MultipleLocator

from routecast.evaluate.names import CONFUSION_COLUMNS, MODELS, PER_LAYER_COLUMNS, PER_LAYER_SET_COLUMNS
from routecast.pipeline.artifacts import atomic_path
from routecast.sim.names import BOUNDS, SLOTS_COLUMNS, WIDTH_COLUMNS

# The one list of predictor names outside the stages: one colour each in every plot; a name
# not listed takes the leftover colours in order.
PREDICTOR_COLOURS = {
    "baseline": "tab:blue", "tuned": "tab:orange", "frequency": "tab:gray", "lookup_1": "tab:olive",
    "lookup_2": "tab:green", "lookup_3": "tab:cyan", "boosted_trees": "tab:purple", "oracle": "black",
    "boosted_trees_full": "indigo",
    "speculative_gate": "tab:red", "on_demand": "saddlebrown", "perfect": "deeppink", "belady": "darkorange",
    "clairvoyant": "magenta", "compute_floor": "dimgray",
}
SPARE_COLOURS = ["gold", "navy", "teal", "lime", "crimson"]
# Training curves: (DVCLive series, panel title, y label); the report reads these series.
TRAINING_PANELS = (("train_loss", "training loss", "cross-entropy (nats per sample)"),
                   ("val_loss", "validation loss", "cross-entropy (nats per sample)"),
                   ("val_top2", "validation top-2 accuracy", "top-2 accuracy (fraction)"),
                   ("val_set_recall", "validation set recall", "set recall (fraction)"))
TUNE_SERIES = ("value", "best_so_far")
DPI = 110


def colour_of(name: str, names: list[str]) -> str:
    if name in PREDICTOR_COLOURS:
        return PREDICTOR_COLOURS[name]
    unknown = [n for n in names if n not in PREDICTOR_COLOURS]
    return SPARE_COLOURS[unknown.index(name) % len(SPARE_COLOURS)]


def reference_label(name: str, revision: str) -> str:
    """The label of a revision's line (kept out of the legend by its leading underscore)."""
    return f"_{name} ({revision})"


def save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    return path


def accuracy_axis(ax: Axes, label: str) -> None:
    """Accuracies are fractions: the axis always spans 0..1 so two plots compare by eye."""
    ax.set_ylim(0.0, 1.0)
    ax.yaxis.set_major_locator(MultipleLocator(0.2))
    ax.yaxis.set_minor_locator(MultipleLocator(0.05))
    ax.set_ylabel(label)
    ax.grid(True, which="major", alpha=0.3)


def revision_legend(ax: Axes, workspace: str, reference: str | None, **kwargs) -> None:
    """A second legend beside the axes' own: line style = revision."""
    if reference is None:
        return
    handles = [Line2D([], [], color="0.3", linestyle="-"), Line2D([], [], color="0.3", linestyle="--")]
    ax.add_artist(Legend(ax, handles, [workspace, reference], title="revision", **kwargs))


def predictor_lines(ax: Axes, frame: pd.DataFrame, x: str, y: str, reference: pd.DataFrame | None,
                    revision: str) -> None:
    """One line per predictor of a long-format frame (x, predictor, y): the bounds and the models
    first (thick), then the others in the order they first appear. A revision's line is drawn
    (dashed) only where it differs from the workspace's, so unchanged predictors do not double
    the clutter."""
    present = list(pd.unique(frame["predictor"]))
    names = [n for n in (*BOUNDS, *MODELS) if n in present] + [n for n in present if n not in (*BOUNDS, *MODELS)]
    gone = [] if reference is None else [n for n in pd.unique(reference["predictor"]) if n not in names]
    for name in names + gone:  # a predictor only the revision has: its dashed line alone
        rows = frame[frame["predictor"] == name].sort_values(x)
        thick = name in MODELS or name in BOUNDS
        if len(rows):  # on_demand's squares show where perfect's line covers it
            ax.plot(rows[x], rows[y], color=colour_of(name, names + gone), label=name,
                    linewidth=2.4 if thick else 1.3, marker="s" if name == "on_demand" else "o" if thick else ".",
                    markersize=6 if name == "on_demand" else 4 if thick else 3,
                    linestyle="-." if name == "oracle" else "-", zorder=3 if thick else 2)
        if reference is None:
            continue
        old = reference[reference["predictor"] == name].sort_values(x)
        same = (old[x].tolist() == rows[x].tolist()
                and np.allclose(old[y].to_numpy(float), rows[y].to_numpy(float), equal_nan=True))
        if len(old) and not same:
            ax.plot(old[x], old[y], color=colour_of(name, names + gone), linestyle="--", linewidth=1.4, alpha=0.7,
                    label=reference_label(name, revision))


def by_predictor(frame: pd.DataFrame, x: str, y: str, reference: pd.DataFrame | None, labels: tuple[str, str],
                 x_label: str, y_label: str, title: str, fraction: bool) -> Figure:
    """A long-format frame as one line per predictor against an integer x; a `fraction` y spans 0..1."""
    fig = Figure(figsize=(11, 5.5), layout="constrained")
    ax = fig.subplots()
    predictor_lines(ax, frame, x, y, reference, labels[1])
    if fraction:
        accuracy_axis(ax, y_label)
    else:
        ax.set_ylim(bottom=0.0)
        ax.set_ylabel(y_label)
        ax.grid(True, alpha=0.3)
    ax.set_xlim(frame[x].min() - 0.5, frame[x].max() + 0.5)
    ax.xaxis.set_major_locator(MultipleLocator(1 if frame[x].nunique() <= 16 else 2))
    ax.xaxis.set_minor_locator(MultipleLocator(1))
    ax.set_xlabel(x_label)
    ax.legend(title="predictor", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    revision_legend(ax, labels[0], labels[1] if reference is not None else None,
                    loc="lower left", bbox_to_anchor=(1.01, 0.0))
    ax.set_title(title)
    return fig


def training_curves(runs: Mapping[str, pd.DataFrame], reference: Mapping[str, pd.DataFrame] | None = None,
                    labels: tuple[str, str] = ("workspace", "reference")) -> Figure:
    """Per-epoch training loss, validation loss, validation top-2 and set recall of each model.

    `runs` maps a model name to its DVCLive series (columns `step` and those of TRAINING_PANELS,
    any may be missing); `reference`, the same at a revision.
    """
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True)

    def long(frames: Mapping[str, pd.DataFrame] | None, column: str) -> pd.DataFrame | None:
        having = [frame[["step", column]].assign(predictor=name) for name, frame in (frames or {}).items()
                  if column in frame]
        return pd.concat(having) if having else None

    for ax, (column, title, ylabel) in zip(axes.flat, TRAINING_PANELS):
        if (now := long(runs, column)) is not None:
            predictor_lines(ax, now, "step", column, long(reference, column), labels[1])
        ax.set_title(title)
        if column.startswith("val_") and column != "val_loss":
            accuracy_axis(ax, ylabel)
        else:
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[1]:
        ax.set_xlabel("DVCLive step (one per epoch)")
    axes[0, 0].legend(title="model", loc="upper right")
    revision_legend(axes[0, 1], labels[0], labels[1] if reference else None, loc="upper right")
    fig.suptitle("Training curves: loss and validation accuracy per epoch")
    return fig


def per_layer_metric(per_layer: pd.DataFrame) -> str:
    """What a per-layer frame holds: `top2`, or `set_recall` (a trace without a primary)."""
    only_set = PER_LAYER_SET_COLUMNS[2] in per_layer.columns and PER_LAYER_COLUMNS[2] not in per_layer.columns
    return PER_LAYER_SET_COLUMNS[2] if only_set else PER_LAYER_COLUMNS[2]


def per_layer_top2(per_layer: pd.DataFrame, reference: pd.DataFrame | None = None,
                   labels: tuple[str, str] = ("workspace", "reference"), lookahead: int | None = None) -> Figure:
    """Test top-2 per source layer for every predictor (metrics/evaluate/per_layer_top2.csv, long
    format: PER_LAYER_COLUMNS, i.e. layer, predictor, top2); set recall instead where the frame
    holds it (PER_LAYER_SET_COLUMNS: a trace without a primary)."""
    target = f"l + {lookahead}" if lookahead else "l + lookahead"
    layer = PER_LAYER_COLUMNS[0]
    if (metric := per_layer_metric(per_layer)) == PER_LAYER_COLUMNS[2]:
        return by_predictor(per_layer, layer, metric, reference, labels,
                            f"source layer l (predicting the primary expert at layer {target})",
                            "top-2 accuracy (fraction of test samples)",
                            "Test top-2 accuracy per layer, every predictor", fraction=True)
    return by_predictor(per_layer, layer, metric, reference, labels,
                        f"source layer l (predicting the expert set at layer {target})",
                        "set recall (share of the true set in the predicted top-k)",
                        "Test set recall per layer, every predictor (the trace has no primary)", fraction=True)


def confusion_matrix(pairs: pd.DataFrame, num_experts: int | None = None, model: str = "tuned") -> Figure:
    """Row-normalised confusion of the top-1 prediction (metrics/evaluate/confusion_<model>.csv:
    one row per test sample, CONFUSION_COLUMNS: actual and predicted)."""
    actual, predicted = (pairs[column].to_numpy(int) for column in CONFUSION_COLUMNS)
    n = num_experts or int(max(actual.max(initial=0), predicted.max(initial=0)) + 1)
    counts = np.zeros((n, n), dtype=np.int64)
    np.add.at(counts, (actual, predicted), 1)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    fig = Figure(figsize=(6.8 if n <= 16 else 9, 5.8 if n <= 16 else 8), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="share of the actual expert's samples")
    if n <= 16:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{shares[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if shares[i, j] > 0.5 else "black")
    ticks = np.arange(n) if n <= 32 else np.arange(0, n, max(1, n // 16))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_yticklabels([f"{i} (n={totals[i, 0]})" for i in ticks], fontsize=8)
    ax.set_xlabel("predicted expert (top-1)")
    ax.set_ylabel("actual primary expert (test samples)")
    accuracy = float((actual == predicted).mean()) if len(actual) else float("nan")
    ax.set_title(f"{model} model, test split: top-1 confusion, rows normalised\n"
                 f"{len(actual)} samples, top-1 accuracy {accuracy:.3f}", fontsize=10)
    return fig


def tune_history(history: pd.DataFrame, reference: pd.DataFrame | None = None,
                 labels: tuple[str, str] = ("workspace", "reference")) -> Figure:
    """Each trial's objective and the best so far (the tune stage's DVCLive series: step = trial
    number, `value` NaN for a pruned or failed trial, `best_so_far`)."""
    history = history.sort_values("step")
    fig = Figure(figsize=(9, 4.8), layout="constrained")
    ax = fig.subplots()
    complete = history[history["value"].notna()]
    no_value = history[history["value"].isna()]
    same = reference is not None and reference.sort_values("step")[["step", "best_so_far"]].reset_index(
        drop=True).equals(history[["step", "best_so_far"]].reset_index(drop=True))
    ax.step(history["step"], history["best_so_far"], where="post", color="tab:orange", linewidth=2,
            label=f"best so far ({labels[0]}{' = ' + labels[1] if same else ''})")
    ax.scatter(complete["step"], complete["value"], color="tab:blue", s=22, zorder=3, label="complete trial")
    # Pruned and failed trials have no value: mark where they are, not at a fake 0.
    for i, trial in enumerate(no_value["step"]):
        ax.axvline(trial, color="tab:red", alpha=0.4, linestyle=":", linewidth=1.2,
                   label="pruned or failed trial (no value)" if i == 0 else "_pruned")
    if reference is not None and not same:
        reference = reference.sort_values("step")
        ax.step(reference["step"], reference["best_so_far"], where="post", color="tab:orange", linestyle="--",
                alpha=0.7, linewidth=1.5, label=f"best so far ({labels[1]})")
    accuracy_axis(ax, "validation objective (fraction)")
    ax.set_xlabel("trial number")
    ax.set_xlim(history["step"].min() - 0.5, history["step"].max() + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="lower right")
    best = history["best_so_far"].dropna()
    ax.set_title(f"Tune history: {len(history)} trials, {len(complete)} with a value"
                 + (f", best {best.iloc[-1]:.4f}" if len(best) else ""))
    return fig


# The prefetch CSVs (long format: x, predictor, plotted value, ...): axis labels, title, whether y is a fraction.
PREFETCH_VIEWS = {
    "stall": (SLOTS_COLUMNS, "experts of each layer held on the GPU (cache slots per layer)", "stall (ms per token)",
              "Prefetch simulation: stall per token against cache slots (on_demand and perfect bound it)", False),
    "hit_rate": (WIDTH_COLUMNS, "experts prefetched per layer (the predictor's best first)",
                 "hit rate (needed experts already resident)",
                 "Prefetch simulation: hit rate against prefetch width, at the configured cache slots", True),
}


def prefetch_view(view: str, frame: pd.DataFrame, reference: pd.DataFrame | None = None,
                  labels: tuple[str, str] = ("workspace", "reference")) -> Figure:
    """`stall` (metrics/prefetch/stall_vs_slots.csv) or `hit_rate` (hit_rate_vs_width.csv): every
    predictor and both bounds against the CSV's x."""
    columns, x_label, y_label, title, fraction = PREFETCH_VIEWS[view]
    x, _, y = columns[:3]
    return by_predictor(frame, x, y, reference, labels, x_label, y_label, title, fraction=fraction)


def prefetch_stall(by_slots: pd.DataFrame, *args: object, **kwargs: object) -> Figure:
    return prefetch_view("stall", by_slots, *args, **kwargs)


def prefetch_hit_rate(by_width: pd.DataFrame, *args: object, **kwargs: object) -> Figure:
    return prefetch_view("hit_rate", by_width, *args, **kwargs)
