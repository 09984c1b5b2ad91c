"""The headline: the few figures a reviewer decides on, as `dvc exp show`, `dvc metrics show` and
`dvc metrics diff` print them (metrics/headline.json, the one file dvc.yaml declares as metrics).

Every key is short and every value a short number, so that a row fits 100 columns:

    base     the baseline's test top-2, in percent (set recall where the trace has no primary)
    tuned    the tuned predictor's, the same way
    ±        the half-width of the wider of their two 95% intervals, in points, rounded up (absent
             where evaluate drew no interval: too few test sequences)
    kind     the tuned predictor's kind
    oracle   tuned as a percentage of the exact oracle (synthetic traces only; absent otherwise)
    gain     tuned minus the best reference predictor (the highest on the test set), paired, in points
    gain±    the half-width of that paired difference's 95% interval, rounded up
    speedup  the tuned predictor's speedup over no prediction in the prefetch simulation, at the
             configured engine (absent when the simulation wrote no figure for it)

Which reference was best, and everything else (per predictor, per horizon, per policy), is in
the detail files (metrics/evaluate.json, metrics/prefetch.json, ...): `routecast report` shows
them, `dvc metrics diff --targets <file>` diffs them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from routecast.errors import InputError

KEYS = ("base", "tuned", "±", "kind", "oracle", "gain", "gain±", "speedup")
# Not reference predictors, among those the tuned model is compared with: the other model and the oracle.
NOT_REFERENCES = frozenset({"baseline", "tuned", "oracle"})


def points(fraction: float) -> float:
    """A fraction as percent, one decimal."""
    return round(100.0 * fraction, 1)


def has_interval(entry: Mapping[str, Any], key: str) -> bool:
    return entry.get(f"{key}_lo") is not None and entry.get(f"{key}_hi") is not None


def half_width(entry: Mapping[str, Any], key: str) -> float:
    """The larger side of `key`'s 95% interval, in points, rounded up to 0.1 (never narrower)."""
    value, lo, hi = entry[key], entry[f"{key}_lo"], entry[f"{key}_hi"]
    return math.ceil(round(1000.0 * max(hi - value, value - lo), 6)) / 10.0


def primary_metric(evaluate: Mapping[str, Any]) -> str:
    """top2 where the trace has a primary (the tuned model has a top-2), else set recall."""
    return "top2" if (evaluate.get("tuned") or {}).get("top2") is not None else "set_recall"


def best_reference(evaluate: Mapping[str, Any], metric: str) -> str | None:
    """The reference predictor with the highest test `metric`, among those the tuned model was
    compared with (its `vs` block); None when there is none."""
    compared = [name for name in (evaluate["tuned"].get("vs") or {}) if name not in NOT_REFERENCES
                and isinstance(evaluate.get(name), Mapping) and evaluate[name].get(metric) is not None]
    return max(compared, key=lambda name: (evaluate[name][metric], name), default=None)


def headline(evaluate: Mapping[str, Any], prefetch: Mapping[str, Any] | None, kind: str,
             source: str = "metrics/evaluate.json") -> dict[str, Any]:
    """The headline from evaluate.json, prefetch.json (None: no simulation) and the tuned kind."""
    for name in ("baseline", "tuned"):
        if not isinstance(evaluate.get(name), Mapping):
            raise InputError(f"{source}: no `{name}` block (was it written by the evaluate stage?)")
    metric = primary_metric(evaluate)
    base, tuned = evaluate["baseline"], evaluate["tuned"]
    for name, entry in (("baseline", base), ("tuned", tuned)):
        if entry.get(metric) is None:
            raise InputError(f"{source}: `{name}` has no {metric}")
    out: dict[str, Any] = {"base": points(base[metric]), "tuned": points(tuned[metric])}
    if all(has_interval(entry, metric) for entry in (base, tuned)):  # none from too few test sequences
        out["±"] = max(half_width(base, metric), half_width(tuned, metric))
    out["kind"] = kind
    if tuned.get(f"{metric}_vs_oracle") is not None:
        out["oracle"] = points(tuned[f"{metric}_vs_oracle"])
    if (ref := best_reference(evaluate, metric)) is not None:
        diff = tuned["vs"][ref]
        key = f"{metric}_diff"
        if diff.get(key) is not None:
            out["gain"] = points(diff[key])
            if has_interval(diff, key):
                out["gain±"] = half_width(diff, key)
    speedup = ((prefetch or {}).get("tuned") or {}).get("speedup_vs_on_demand")
    if speedup is not None and math.isfinite(speedup):
        out["speedup"] = round(speedup, 3)
    return out


def labels(evaluate: Mapping[str, Any]) -> dict[str, str | None]:
    """What the headline's numbers are of: the metric (`top2` / `set_recall`) and the best reference."""
    metric = primary_metric(evaluate)
    return {"metric": metric, "reference": best_reference(evaluate, metric) if "tuned" in evaluate else None}
