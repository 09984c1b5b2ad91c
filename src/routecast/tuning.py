"""Bayesian search (Optuna) over the seed's search space, objective = validation top-2.

The study is stored in a journal file (`tune.storage`, persisted by DVC), named after a
fingerprint of everything that changes a trial's value (the train split, the search space, the
per-trial budget), so a re-run with a larger `n_trials` continues the same study while a change
of data starts a new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna

from routecast.features import Features
from routecast.params import ModelParams, Params, SearchSpace
from routecast.training import split_train_val, train_model

log = logging.getLogger(__name__)

OBJECTIVE = "val_top2"


def suggest_config(trial: optuna.Trial, space: SearchSpace) -> ModelParams:
    n_layers = trial.suggest_int("n_layers", space.n_layers.low, space.n_layers.high)
    low, high, step = space.units.first
    units = [trial.suggest_int("units_0", low, high, step=step)]
    for i in range(1, n_layers):
        low, high, step = space.units.later
        # Each later layer is at most as wide as the one before.
        units.append(trial.suggest_int(f"units_{i}", low, max(low, min(high, units[-1])), step=step))
    return ModelParams(
        lr=trial.suggest_float("lr", space.lr.low, space.lr.high, log=space.lr.log),
        layer_emb=trial.suggest_int("layer_emb", space.layer_emb.low, space.layer_emb.high),
        expert_emb=trial.suggest_int("expert_emb", space.expert_emb.low, space.expert_emb.high),
        architecture=units,
        dropout=trial.suggest_float("dropout", space.dropout.low, space.dropout.high, log=space.dropout.log),
    )


def trial_params(config: ModelParams) -> dict[str, Any]:
    """The Optuna parameters that `suggest_config` maps to `config` (for enqueueing)."""
    params: dict[str, Any] = {"n_layers": len(config.architecture), "lr": config.lr, "layer_emb": config.layer_emb,
                              "expert_emb": config.expert_emb, "dropout": config.dropout}
    params.update({f"units_{i}": u for i, u in enumerate(config.architecture)})
    return params


def config_from_trial(trial: optuna.trial.FrozenTrial) -> ModelParams:
    p = trial.params
    return ModelParams(lr=float(p["lr"]), layer_emb=int(p["layer_emb"]), expert_emb=int(p["expert_emb"]),
                       architecture=[int(p[f"units_{i}"]) for i in range(int(p["n_layers"]))],
                       dropout=float(p["dropout"]))


def study_fingerprint(params: Params, train_digest: str) -> str:
    """Everything that changes a trial's value; not n_trials or timeout, so a study can grow."""
    tune = params.tune
    key = {"train": train_digest, "space": asdict(tune.search_space), "epochs": tune.epochs,
           "max_train_samples": tune.max_train_samples, "seed": tune.seed, "train_params": asdict(params.train)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_storage(storage: str) -> optuna.storages.BaseStorage:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    path = Path(storage)
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def make_sampler(params: Params) -> optuna.samplers.BaseSampler:
    if params.tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=params.tune.seed)
    return optuna.samplers.TPESampler(seed=params.tune.seed, n_startup_trials=min(5, params.tune.n_trials))


def make_pruner(params: Params) -> optuna.pruners.BasePruner:
    if params.tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    return optuna.pruners.NopPruner()


@dataclass
class TuneResult:
    best: ModelParams
    best_value: float
    summary: dict[str, Any]
    trials: list[optuna.trial.FrozenTrial]


def tune(params: Params, train: Features, train_digest: str) -> TuneResult:
    start = time.perf_counter()
    fit, val = split_train_val(train, params.tune.max_train_samples, seed=params.tune.seed)
    name = f"{params.tune.study_name}-{study_fingerprint(params, train_digest)}"
    study = optuna.create_study(storage=make_storage(params.tune.storage), study_name=name, direction="maximize",
                                sampler=make_sampler(params), pruner=make_pruner(params), load_if_exists=True)
    if not study.trials:
        # The seed's two known configurations go first: the baseline and the seed's best.
        study.enqueue_trial(trial_params(params.baseline), user_attrs={"origin": "baseline"})
        study.enqueue_trial(trial_params(ModelParams(lr=0.000536, layer_emb=5, expert_emb=7,
                                                     architecture=[512, 512], dropout=0.18)),
                            user_attrs={"origin": "seed_best"})

    def objective(trial: optuna.Trial) -> float:
        config = suggest_config(trial, params.tune.search_space)

        def report(epoch: int, row: dict[str, float]) -> None:
            trial.report(row[OBJECTIVE], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {epoch}: val top-2 {row[OBJECTIVE]:.4f}")

        result = train_model(config, params.train, fit, val, epochs=params.tune.epochs, on_epoch=report,
                             desc=f"trial {trial.number}")
        return result.best_val_top2

    done = sum(t.state.is_finished() for t in study.trials)
    remaining = max(params.tune.n_trials - done, 0)
    log.info("study %s: %d trials finished, running %d more on %d train / %d validation samples", name, done,
             remaining, len(fit), len(val))
    if remaining:
        study.optimize(objective, n_trials=remaining, timeout=params.tune.timeout, gc_after_trial=False)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise RuntimeError(f"study {name}: no trial completed; see the log above")
    best = study.best_trial
    summary = {
        "best_value": best.value,
        "best_trial": best.number,
        "best_params": asdict(config_from_trial(best)),
        "study": name,
        "n_trials": len(study.trials),
        "n_complete": len(complete),
        "n_pruned": len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,))),
        "n_failed": len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))),
        "train_samples": len(fit),
        "val_samples": len(val),
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    return TuneResult(config_from_trial(best), best.value, summary, study.trials)


def history_rows(trials: list[optuna.trial.FrozenTrial]) -> list[list[Any]]:
    """trial, state, value, best so far, seconds: for the optimization-history plot."""
    rows, best = [], float("-inf")
    for t in sorted(trials, key=lambda t: t.number):
        value = t.value if t.state == optuna.trial.TrialState.COMPLETE else None
        if value is not None:
            best = max(best, value)
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        rows.append([t.number, t.state.name, value, best if best > float("-inf") else None, seconds])
    return rows
