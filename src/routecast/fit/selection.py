"""Final selection: tune's pick is chosen under full training, never at a short trial budget.

A trial trains for `tune.epochs`. When that is shorter than full training, or on a subsample, a
configuration that learns slowly (the seed's MLP on a real log climbs for 12 epochs) ranks below
one that learns fast and stops early (the mixture). After the search, the finalists (the best
complete trial of each kind, and the baseline's configuration as the search space starts it, even
where its trial was pruned) are each trained as `train_full` trains: the whole fit part of the
train split, `train.epochs` with early stopping, the same seed. `tuned` is the finalist with the
best validation objective, so on validation it is never below the baseline's configuration.

Each finalist's figures are kept in the study (a user attribute keyed by its configuration, the
training params, the train split and the code), so a resumed study (more `n_trials`) trains only
the finalists it has not trained before; its model is kept as `<dir>/<key>.pt`, the file
train_full would write, so train_full copies the pick (and the baseline, when it is a finalist)
instead of training it again. With full-length trials (`tune.epochs` null, the default, on the
whole fit part) each trial is that training already: tune `record`s it as it finishes, and
selection trains nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from routecast.config.params import ModelParams, Params
from routecast.data.features import Features
from routecast.fit.training import TrainResult, fit_predictor, split_train_val

log = logging.getLogger(__name__)

BASELINE_ORIGIN = "baseline"  # the starting point of the mlp kind that is the seed's baseline
CACHE_PREFIX = "finalist:"


@dataclass(frozen=True)
class Finalist:
    origin: str  # "baseline", or "trial N"
    config: ModelParams
    trial_value: float | None  # its value in the search (None: not run there, or pruned)
    value: float  # the validation objective under full training, at the epoch training keeps
    best_epoch: int
    cached: bool  # read from the study, not trained in this run

    def to_plain(self) -> dict[str, Any]:
        return {"origin": self.origin, "kind": self.config.kind, "trial_value": self.trial_value,
                "value": self.value, "best_epoch": self.best_epoch, "params": self.config.to_plain()}


def candidates(trials: Sequence[FrozenTrial], starting: Sequence[tuple[str, ModelParams]],
               config_of: Callable[[FrozenTrial], ModelParams]) -> list[tuple[str, ModelParams, float | None]]:
    """(origin, configuration, search value) of each finalist: the best complete trial of each kind
    (by value; the lower number on a tie), then the baseline's starting configuration unless one of
    those already is it."""
    best: dict[str, FrozenTrial] = {}
    for trial in sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: (-t.value, t.number)):
        best.setdefault(trial.params.get("kind", "mlp"), trial)
    out = [(f"trial {t.number}", config_of(t), float(t.value)) for t in best.values()]
    seen = {plain(config) for _, config, _ in out}
    for origin, config in starting:
        if origin == BASELINE_ORIGIN and plain(config) not in seen:
            ran = [t for t in trials if t.user_attrs.get("origin") == origin and t.state == TrialState.COMPLETE]
            out.append((BASELINE_ORIGIN, config, float(ran[0].value) if ran else None))
    return out


def plain(config: ModelParams) -> str:
    return json.dumps(config.to_plain(), sort_keys=True)


def cache_key(config: ModelParams, params: Params, train_digest: str, code: str) -> str:
    """What changes a finalist's figures: its configuration, the training params, the split, the code."""
    blob = json.dumps({"config": config.to_plain(), "train": repr(params.train),
                       "objective": repr(params.tune.objective), "split": train_digest, "code": code}, sort_keys=True)
    return CACHE_PREFIX + hashlib.sha256(blob.encode()).hexdigest()[:16]


def model_path(directory: str | Path, key: str) -> Path:
    """Where a finalist's model is kept (and where train_full looks for it)."""
    return Path(directory) / f"{key.removeprefix(CACHE_PREFIX)}.pt"


def record(key: str, result: TrainResult, value: float, params: Params, fit_meta: Any,
           store: Callable[[str, dict[str, Any]], None], models: str | Path | None) -> dict[str, Any]:
    """Keep a configuration trained in full as a finalist: `store` its figures under `key` and save its
    model under `models` (the file train_full would write). Final selection calls it for what it
    trains; tune for a trial that trains as train_full does (it is then its own finalist)."""
    from routecast.predictors.checkpoints import save_trained  # torch: only when something trains

    hit = {"value": value, "best_epoch": int(result.best_epoch)}
    if models is not None:
        save_trained(model_path(models, key), result, fit_meta, params.train.for_samples(fit_meta.weighted).target)
    store(key, hit)
    return hit


def select(params: Params, train: Features, train_digest: str, code: str,
           picks: list[tuple[str, ModelParams, float | None]], cache: dict[str, Any],
           store: Callable[[str, dict[str, Any]], None], score: Callable[[dict[str, float]], float],
           models: str | Path | None = None) -> list[Finalist]:
    """Train each of `picks` in full (or read it from `cache`, `store`-ing what is new, and saving
    its model under `models`); the finalists, best first (by value; the earlier pick on a tie)."""
    fit, val = split_train_val(train)  # as train_full: all of the fit part, the marked validation sequences
    out, keys = [], set()
    for origin, config, trial_value in picks:
        key = cache_key(config, params, train_digest, code)
        keys.add(key)
        hit = cache.get(key)
        if hit is not None and models is not None and not model_path(models, key).exists():
            hit = None  # its figures are known but its model is gone (a new workspace): train it again
        if hit is None:
            result = fit_predictor(config, params.train, fit, val, desc=f"finalist {origin} ({config.kind})")
            kept = next(row for row in result.history if row["epoch"] == result.best_epoch)
            hit = record(key, result, score(kept), params, fit.meta, store, models)
        out.append(Finalist(origin, config, trial_value, float(hit["value"]), int(hit["best_epoch"]),
                            cache.get(key) is hit))
        log.info("finalist %s (%s): search %s, full training %.4f at epoch %d%s", origin, config.kind,
                 "—" if trial_value is None else f"{trial_value:.4f}", out[-1].value, out[-1].best_epoch,
                 " (trained before: by its trial, or an earlier selection)" if out[-1].cached else "")
    if models is not None:  # keep only this selection's models (others are of other params, splits or code)
        wanted = {model_path(models, key).name for key in keys}
        for stale in Path(models).glob("*.pt"):
            if stale.name not in wanted:
                stale.unlink()
    return sorted(out, key=lambda f: -f.value)
