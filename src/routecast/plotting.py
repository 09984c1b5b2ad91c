"""Static PNG plots of the pipeline's results for the review report (`routecast report`).

The interactive views live in dvc.yaml (`dvc plots show`); these are the same plots as images a
pull-request comment can hold. Each function draws the workspace's data, and a git revision's
data dashed beside it when given, and writes one PNG. Figures are built without pyplot, so
importing this module changes no global matplotlib state.
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

from routecast.artifacts import atomic_path

# One colour per predictor in every plot; unknown names take the leftover colours in order.
PREDICTOR_COLOURS = {
    "baseline": "tab:blue", "tuned": "tab:orange", "frequency": "tab:gray", "lookup_1": "tab:olive",
    "lookup_2": "tab:green", "lookup_3": "tab:cyan", "boosted_trees": "tab:purple", "oracle": "black",
    "speculative_gate": "tab:red",
}
SPARE_COLOURS = ["tab:brown", "tab:pink", "gold", "navy", "teal"]
MODELS = ("baseline", "tuned")
DPI = 110


def colour_of(name: str, names: list[str]) -> str:
    if name in PREDICTOR_COLOURS:
        return PREDICTOR_COLOURS[name]
    unknown = [n for n in names if n not in PREDICTOR_COLOURS]
    return SPARE_COLOURS[unknown.index(name) % len(SPARE_COLOURS)]


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


def training_curves(runs: Mapping[str, pd.DataFrame], path: str | Path,
                    reference: Mapping[str, pd.DataFrame] | None = None,
                    labels: tuple[str, str] = ("workspace", "reference")) -> Path:
    """Per-epoch training loss, validation loss, validation top-1 and top-2 of each model.

    `runs` maps a model name to its metrics/train/<name>.csv; `reference`, the same at a revision.
    """
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True)
    panels = [("train_loss", "training loss", "cross-entropy (nats per sample)"),
              ("val_loss", "validation loss", "cross-entropy (nats per sample)"),
              ("val_top1", "validation top-1 accuracy", "top-1 accuracy (fraction)"),
              ("val_top2", "validation top-2 accuracy", "top-2 accuracy (fraction)")]
    names = list(runs)
    for ax, (column, title, ylabel) in zip(axes.flat, panels):
        for name, frame in runs.items():
            ax.plot(frame["epoch"], frame[column], marker="o", markersize=3.5, linewidth=2,
                    color=colour_of(name, names), label=name)
        for name, frame in (reference or {}).items():
            if column in frame:
                ax.plot(frame["epoch"], frame[column], linestyle="--", linewidth=1.5, alpha=0.75,
                        color=colour_of(name, names))
        ax.set_title(title)
        if column.startswith("val_top"):
            accuracy_axis(ax, ylabel)
        else:
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    axes[0, 0].legend(title="model", loc="upper right")
    revision_legend(axes[0, 1], *labels if reference else (labels[0], None), loc="upper right")
    fig.suptitle("Training curves: loss and validation accuracy per epoch")
    return save(fig, path)


def per_layer_top2(per_layer: pd.DataFrame, path: str | Path, reference: pd.DataFrame | None = None,
                   labels: tuple[str, str] = ("workspace", "reference"), lookahead: int | None = None) -> Path:
    """Test top-2 per source layer for every predictor (columns of metrics/evaluate/per_layer_top2.csv).

    A reference revision's line is drawn (dashed) only where it differs from the workspace's,
    so unchanged reference predictors do not double the clutter.
    """
    names = [c for c in per_layer.columns if c != "layer"]
    fig = Figure(figsize=(11, 5.5), layout="constrained")
    ax = fig.subplots()
    for name in names:
        model = name in MODELS
        ax.plot(per_layer["layer"], per_layer[name], color=colour_of(name, names), label=name,
                linewidth=2.4 if model else 1.3, marker="o" if model else ".", markersize=4 if model else 3,
                linestyle="-." if name == "oracle" else "-", zorder=3 if model else 2)
        if reference is not None and name in reference:
            old = reference.set_index("layer")[name].reindex(per_layer["layer"])
            if not np.allclose(old.to_numpy(), per_layer[name].to_numpy(), equal_nan=True):
                ax.plot(per_layer["layer"], old.to_numpy(), color=colour_of(name, names), linestyle="--",
                        linewidth=1.4, alpha=0.7)
    accuracy_axis(ax, "top-2 accuracy (fraction of test samples)")
    layers = per_layer["layer"].to_numpy()
    ax.set_xlim(layers.min() - 0.5, layers.max() + 0.5)
    ax.xaxis.set_major_locator(MultipleLocator(1 if len(layers) <= 16 else 2))
    ax.xaxis.set_minor_locator(MultipleLocator(1))
    target = f"l + {lookahead}" if lookahead else "l + lookahead"
    ax.set_xlabel(f"source layer l (predicting the primary expert at layer {target})")
    ax.legend(title="predictor", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    revision_legend(ax, *labels if reference is not None else (labels[0], None),
                    loc="lower left", bbox_to_anchor=(1.01, 0.0))
    ax.set_title("Test top-2 accuracy per layer, every predictor")
    return save(fig, path)


def confusion_matrix(pairs: pd.DataFrame, path: str | Path, num_experts: int | None = None,
                     model: str = "tuned") -> Path:
    """Row-normalised confusion of the top-1 prediction (metrics/evaluate/confusion_<model>.csv:
    one row per test sample, columns actual and predicted)."""
    actual, predicted = pairs["actual"].to_numpy(int), pairs["predicted"].to_numpy(int)
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
    return save(fig, path)


def tune_history(history: pd.DataFrame, path: str | Path, reference: pd.DataFrame | None = None,
                 labels: tuple[str, str] = ("workspace", "reference")) -> Path:
    """Each trial's validation top-2 and the best so far (metrics/tune/history.csv)."""
    fig = Figure(figsize=(9, 4.8), layout="constrained")
    ax = fig.subplots()
    complete = history[history["state"] == "COMPLETE"]
    other = history[history["state"] != "COMPLETE"]
    same = reference is not None and reference["best_so_far"].reset_index(drop=True).equals(
        history["best_so_far"].reset_index(drop=True))
    ax.step(history["trial"], history["best_so_far"], where="post", color="tab:orange", linewidth=2,
            label=f"best so far ({labels[0]}{' = ' + labels[1] if same else ''})")
    ax.scatter(complete["trial"], complete["val_top2"], color="tab:blue", s=22, zorder=3, label="complete trial")
    # Pruned and failed trials have no value: mark where they are, not at a fake 0.
    for i, trial in enumerate(other["trial"]):
        ax.axvline(trial, color="tab:red", alpha=0.4, linestyle=":", linewidth=1.2,
                   label="pruned or failed trial (no value)" if i == 0 else None)
    if reference is not None and not same:
        ax.step(reference["trial"], reference["best_so_far"], where="post", color="tab:orange", linestyle="--",
                alpha=0.7, linewidth=1.5, label=f"best so far ({labels[1]})")
    accuracy_axis(ax, "validation top-2 accuracy (fraction)")
    ax.set_xlabel("trial number")
    ax.set_xlim(history["trial"].min() - 0.5, history["trial"].max() + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="lower right")
    best = history["best_so_far"].dropna()
    ax.set_title(f"Tune history: {len(history)} trials, {len(complete)} complete"
                 + (f", best validation top-2 {best.iloc[-1]:.4f}" if len(best) else ""))
    return save(fig, path)
