"""Bayesian search (Optuna) across predictor kinds, objective = `tune.objective`: by default the
validation objective of `routecast.fit.training` at the main horizon (top-2, or set recall with
`train.target: set`); or one other target (a horizon of `features.horizons`, `next_token`), or a
weighted mix of them, each its head's figure at the epoch training keeps.

Each trial draws a kind among the blocks of `tune.search_space`, then that kind's configuration
(the kind's own `suggest`, `routecast.predictors.registry`); a new study first runs each kind's
starting points (the seed's baseline and best MLP, the others' defaults).

The study is named after a fingerprint of everything that changes a trial's value (the train
split, the search space, the per-trial budget, the code a trial runs), so a re-run with a larger
`n_trials` continues the same study while a change of data starts a new one. It lives in
`tune.storage` (a journal file or a database URL: see `routecast.fit.study_storage`, which also
fails and retries the trials of workers that died).

A trial trains `tune.epochs` (null, the default: `train.epochs` with early stopping, on the whole
fit part unless `tune.max_train_samples` subsamples it). Such a full-length trial is the training
train_full would give, so it is kept as a finalist as it finishes (`routecast.fit.selection`) and
final selection trains nothing again. Each trial reports its validation objective after every
epoch, so a pruner (`tune.pruner`: none by default, or the per-kind median, or Hyperband) can stop
a configuration early; any pruner judges at early epochs, where a slow learner looks worst.

Every process (the `tune` stage and any `--worker`) starts a trial only while the study holds
fewer than `n_trials` finished (complete or pruned) plus running trials; the stage then waits
for the other workers' trials, so the study ends with `n_trials` finished trials (one more per
worker that raced for the last slot at the same instant).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from routecast.config.params import ModelParams, Params, SearchSpace, TuneParams
from routecast.data.features import Features
from routecast.fit.selection import CACHE_PREFIX, cache_key, candidates, record, select
from routecast.fit.study_storage import WORKER_ATTR, fail_dead_trials, make_storage, redact, worker_record
from routecast.fit.training import TrainResult, fit_predictor, objective_name, split_train_val
from routecast.pipeline.codegraph import SOURCE, code_digest
from routecast.predictors import registry

log = logging.getLogger(__name__)

POLL_SECONDS = 2.0  # how often the stage checks on other workers' trials
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


# --------------------------------------------------------------------------- search space


def suggest_config(trial: optuna.Trial, space: SearchSpace) -> ModelParams:
    """A configuration of one of the kinds in `space`: the kind first, then the kind's own knobs."""
    kind = trial.suggest_categorical("kind", list(space.kinds))
    return ModelParams(kind, registry.get(kind).suggest(trial, space.kinds[kind]))


def trial_params(config: ModelParams) -> dict[str, Any]:
    """The Optuna parameters that `suggest_config` maps to `config` (for enqueueing)."""
    return {"kind": config.kind, **registry.get(config.kind).trial_params(config.config)}


def config_from_trial(trial: FrozenTrial) -> ModelParams:
    """The configuration a finished trial ran (its kind's knobs not searched at their defaults)."""
    kind = trial.params.get("kind", "mlp")
    return ModelParams(kind, registry.get(kind).from_trial(trial.params))


def starting_points(space: SearchSpace) -> list[tuple[str, ModelParams]]:
    """The configurations every new study runs first: each kind's own starting points (inside its space)."""
    return [(origin, ModelParams(kind, config)) for kind, kind_space in space.kinds.items()
            for origin, config in registry.get(kind).starting_points(kind_space)]


def trial_code_digest(source: Path = SOURCE) -> str:
    """The code a trial runs (the tuning module and everything it imports, from the source): a change
    to any of it starts a fresh study instead of reusing values the new code would not give."""
    return code_digest(["routecast.fit.tuning"], source)


def study_fingerprint(params: Params, train_digest: str) -> str:
    """Everything that changes a trial's value; not n_trials or timeout, so a study can grow."""
    tune = params.tune
    key = {"train": train_digest, "space": tune.search_space.to_plain(), "epochs": trial_epochs(params),
           "objective": objective_label(params),
           "max_train_samples": tune.max_train_samples, "seed": tune.seed,
           # train.epochs is full training's budget, not a trial's (tune.epochs is).
           "train_params": {k: v for k, v in asdict(params.train).items() if k != "epochs"},
           "code": trial_code_digest()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def trial_epochs(params: Params) -> int:
    """A trial's epoch budget: tune.epochs, or train.epochs when it is null (full training)."""
    return params.tune.epochs if params.tune.epochs is not None else params.train.epochs


def study_name(params: Params, train_digest: str) -> str:
    return f"{params.tune.study_name}-{study_fingerprint(params, train_digest)}"


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- sampler, pruner


def derived_seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


def make_sampler(tune: TuneParams, seed: int) -> optuna.samplers.BaseSampler:
    n_startup = min(5, tune.n_trials)
    if tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if tune.sampler == "gp":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # Deeper layers' widths are conditional; the GP models the shared parameters, the
            # independent (random) sampler draws the rest.
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup, warn_independent_sampling=False)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup)


def make_pruner(tune: TuneParams) -> optuna.pruners.BasePruner:
    """`median` (the default) prunes a trial whose validation value at an epoch is below the median of
    the earlier trials *of its own kind* there: kinds learn at different speeds (lookup_mlp starts at
    the lookup table, the GRU from scratch), so comparing across kinds at epoch 1 would prune the slow
    starters. `hyperband` compares every trial in its bracket, whatever its kind (use it with one kind)."""
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=tune.epochs)
    if tune.pruner == "median":
        return PerKindPruner(optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1))
    return optuna.pruners.NopPruner()


class PerKindPruner(optuna.pruners.BasePruner):
    """Run `base` (a pruner that reads the study through `get_trials`) as if the study held only the
    trials of the pruned trial's kind."""

    def __init__(self, base: optuna.pruners.BasePruner) -> None:
        self.base = base

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        return self.base.prune(_KindView(study, trial.params.get("kind")), trial)


class _KindView:
    """The study's trials of one kind (what MedianPruner reads: get_trials and direction)."""

    def __init__(self, study: optuna.Study, kind: str | None) -> None:
        self._study, self._kind = study, kind
        self.direction = study.direction

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[FrozenTrial]:
        trials = self._study.get_trials(deepcopy=deepcopy, states=states)
        return [t for t in trials if t.params.get("kind") == self._kind]


# --------------------------------------------------------------------------- running trials


def open_study(params: Params, train_digest: str, seed: int | None = None) -> tuple[optuna.Study, Any]:
    """Create or load the study; the sampler's seed also depends on how many trials it holds, so a
    resumed study does not redraw the configurations of its first run.

    Whichever process creates the study (the stage or a worker: the storage lets only one
    succeed) enqueues the seed's two known configurations, so they run first exactly once.
    """
    storage = make_storage(params.tune.storage)
    name = study_name(params, train_digest)
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize",
                                    pruner=make_pruner(params.tune))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([objective_label(params)])  # optuna-dashboard's label
        for origin, config in starting_points(params.tune.search_space):
            study.enqueue_trial(trial_params(config), user_attrs={"origin": origin})
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, pruner=make_pruner(params.tune))
    n_existing = len(study.get_trials(deepcopy=False))
    if seed is None:
        seed = params.tune.seed if n_existing == 0 else derived_seed(params.tune.seed, n_existing)
    study.sampler = make_sampler(params.tune, seed)
    return study, storage


def objective_weights(params: Params) -> dict[str, float]:
    """`tune.objective` as validation-row keys and their weights (`routecast.fit.training.validate`)."""
    target, main = params.train.target, params.features.horizons[0]
    weights = params.tune.objective.weights or ((main, 1.0),)
    return {objective_name(target, None if d == main else d): w for d, w in weights}


def objective_label(params: Params) -> str:
    """The objective's name in tune.json and optuna-dashboard: `val_top2`, or `0.5*val_top2+0.5*...`."""
    weights = objective_weights(params)
    if len(weights) == 1:
        return next(iter(weights))
    return "+".join(f"{w:g}*{key}" for key, w in weights.items())


def objective_value(weights: dict[str, float], row: dict[str, float]) -> float:
    missing = [key for key in weights if key not in row]
    if missing:
        raise ValueError(f"tune.objective: the trial's validation has no {missing} (its kind predicts the main "
                         "horizon only); objective main, or search kinds with a head per target")
    return float(sum(w * row[key] for key, w in weights.items()))


def make_objective(params: Params, fit: Features, val: Features,
                   keep: Callable[[ModelParams, TrainResult, float], None] | None = None,
                   ) -> Callable[[optuna.Trial], float]:
    """The trial function; `keep` sees each completed trial's configuration, training and value."""
    weights, label = objective_weights(params), objective_label(params)

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr(WORKER_ATTR, worker_record(trial.number))
        config = suggest_config(trial, params.tune.search_space)

        def report(epoch: int, row: dict[str, float]) -> None:
            if epoch == 0:
                return  # lookup_mlp's table before training: no resource spent, nothing to prune on
            value = objective_value(weights, row)
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {epoch}: {label} {value:.4f}")

        result = fit_predictor(config, params.train, fit, val, epochs=params.tune.epochs, on_epoch=report,
                               desc=f"trial {trial.number} ({config.kind})")
        # the objective at the epoch training keeps (chosen by the main horizon, as train_full chooses)
        kept = next(row for row in result.history if row["epoch"] == result.best_epoch)
        value = objective_value(weights, kept)
        if keep is not None:
            keep(config, result, value)
        return value

    return objective


def resolve_params(params: Params, train: Features) -> Params:
    """The params trials run under: training params for this trace's samples, and tune.epochs
    null resolved to train.epochs."""
    return replace(params, train=params.train.for_samples(train.meta.weighted),
                   tune=replace(params.tune, epochs=trial_epochs(params)))


def run_trials(study: optuna.Study, storage: Any, objective: Callable[[optuna.Trial], float], tune: TuneParams,
               wait_for_others: bool, on_trial: Callable[[FrozenTrial], None] | None = None) -> int:
    """Run trials until the study holds `tune.n_trials` finished ones or `tune.timeout` passes.

    A trial starts only while finished + running < n_trials, so N workers do not overshoot.
    With `wait_for_others`, return only once no trial of any worker is still running.
    Return the number of trials this process ran.
    """
    start, ran, waiting_logged = time.monotonic(), 0, False
    while True:
        fail_dead_trials(study, storage)
        trials = study.get_trials(deepcopy=False)
        finished = sum(t.state in FINISHED for t in trials)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        timed_out = tune.timeout is not None and time.monotonic() - start >= tune.timeout
        if timed_out:
            log.info("timeout %.0fs reached: %d of %d trials finished", tune.timeout, finished, tune.n_trials)
            return ran
        if finished >= tune.n_trials and (running == 0 or not wait_for_others):
            return ran
        if finished + running < tune.n_trials:
            callbacks = [lambda _, trial: on_trial(trial)] if on_trial is not None else None
            study.optimize(objective, n_trials=1, gc_after_trial=False, callbacks=callbacks)
            ran += 1
            waiting_logged = False
        else:
            if not waiting_logged:
                log.info("%d trials finished, waiting for %d running on other workers", finished, running)
                waiting_logged = True
            time.sleep(POLL_SECONDS)


@dataclass
class TuneResult:
    best: ModelParams
    best_value: float
    summary: dict[str, Any]
    trials: list[FrozenTrial]
    importances: dict[str, float]


def _quiet_optuna() -> None:
    # Optuna logs every trial at INFO through its own handler; ours already says what matters.
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def tune(params: Params, train: Features, train_digest: str,
         on_trial: Callable[[FrozenTrial], None] | None = None, finalists: str | Path | None = None) -> TuneResult:
    """The `tune` stage: run (and wait for) trials until the study is done, select under full
    training (`tune.final_selection`; the finalists' models saved under `finalists`), summarise.
    `on_trial` sees each trial this process finishes (e.g. to log it)."""
    start = time.perf_counter()
    _quiet_optuna()
    params = resolve_params(params, train)
    fit, val = split_train_val(train, params.tune.max_train_samples, seed=params.tune.seed)
    study, storage = open_study(params, train_digest)
    finished = sum(t.state in FINISHED for t in study.get_trials(deepcopy=False))
    # A trial that trains as train_full does (train.epochs on the whole fit part) is its own finalist:
    # its figures and model are kept as final selection keeps them, so selection trains it no more.
    full_length = params.tune.epochs == params.train.epochs and len(fit) == int((~train.is_val).sum())
    keep = None
    if params.tune.final_selection and full_length:
        code = trial_code_digest()

        def keep(config: ModelParams, result: TrainResult, value: float) -> None:
            record(cache_key(config, params, train_digest, code), result, value, params, fit.meta,
                   study.set_user_attr, finalists)
    log.info("study %s on %s: %d of %d trials finished; %s sampler, %s pruner, %d train / %d validation samples",
             study.study_name, redact(params.tune.storage), finished, params.tune.n_trials, params.tune.sampler,
             params.tune.pruner, len(fit), len(val))
    if on_trial is not None:  # a resumed study: its earlier trials first, so a log of them is whole
        for trial in sorted(study.get_trials(deepcopy=False, states=FINISHED), key=lambda t: t.number):
            on_trial(trial)
    ran = run_trials(study, storage, make_objective(params, fit, val, keep), params.tune, wait_for_others=True,
                     on_trial=on_trial)
    trials = study.get_trials(deepcopy=True)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        raise RuntimeError(f"study {study.study_name}: no trial completed; see the log above")
    best = study.best_trial
    chosen, chosen_value, final = config_from_trial(best), best.value, None
    if params.tune.final_selection:
        weights = objective_weights(params)
        picks = candidates(trials, starting_points(params.tune.search_space), config_from_trial)
        cache = {k: v for k, v in study.user_attrs.items() if k.startswith(CACHE_PREFIX)}
        final = select(params, train, train_digest, trial_code_digest(), picks, cache, study.set_user_attr,
                       lambda row: objective_value(weights, row), finalists)
        chosen, chosen_value = final[0].config, final[0].value
    importances = param_importances(study, params.tune.seed)
    counts = {state: sum(t.state == state for t in trials) for state in TrialState}
    summary = {
        # the pick: the finalists' best, its value under full training (without final selection, the search's best)
        "best_value": chosen_value,
        "best_params": chosen.to_plain(),
        "best_trial": best.number,  # the search's best trial, at the trials' budget
        "best_trial_value": best.value,
        "best_trial_params": config_from_trial(best).to_plain(),
        "finalists": None if final is None else [f.to_plain() for f in final],
        "objective": objective_label(params),
        "study": study.study_name,
        "storage": redact(params.tune.storage),
        "sampler": params.tune.sampler,
        "pruner": params.tune.pruner,
        "n_trials": len(trials),
        "n_complete": counts[TrialState.COMPLETE],
        "n_pruned": counts[TrialState.PRUNED],
        "n_failed": counts[TrialState.FAIL],
        "epochs_trained": sum(len(t.intermediate_values) for t in trials),
        "importances": importances,
        "train_samples": len(fit),
        "val_samples": len(val),
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    log.info("study %s: best trial %d, %s %.4f (%d complete, %d pruned, %d failed; %d run here)",
             study.study_name, best.number, summary["objective"], best.value, summary["n_complete"],
             summary["n_pruned"],
             summary["n_failed"], ran)
    if final is not None:
        log.info("final selection: %s (%s), validation %.4f under full training; the search's best was trial %d",
                 final[0].origin, chosen.kind, final[0].value, best.number)
    return TuneResult(chosen, chosen_value, summary, trials, importances)


def tune_worker(params: Params, train: Features, train_digest: str) -> int:
    """Join the study from another process or machine; return how many trials this worker ran.

    The worker's sampler seed comes from its host and pid, so workers do not propose the same
    configurations in lockstep.
    """
    _quiet_optuna()
    params = resolve_params(params, train)
    fit, val = split_train_val(train, params.tune.max_train_samples, seed=params.tune.seed)
    seed = derived_seed(params.tune.seed, socket.gethostname(), os.getpid())
    study, storage = open_study(params, train_digest, seed=seed)
    log.info("worker %s:%d joins study %s on %s", socket.gethostname(), os.getpid(), study.study_name,
             redact(params.tune.storage))
    ran = run_trials(study, storage, make_objective(params, fit, val), params.tune, wait_for_others=False)
    log.info("worker %s:%d ran %d trials; the study holds %d finished", socket.gethostname(), os.getpid(), ran,
             sum(t.state in FINISHED for t in study.get_trials(deepcopy=False)))
    return ran


# --------------------------------------------------------------------------- plots


def param_importances(study: optuna.Study, seed: int) -> dict[str, float]:
    """fANOVA importances over the complete trials; {} when fewer than two (or all equal)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2 or len({t.value for t in complete}) < 2:
        log.info("parameter importances need two complete trials with different values; skipped")
        return {}
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
        raw = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (RuntimeError, ValueError) as exc:
        log.warning("parameter importances failed: %s", exc)
        return {}
    return {name: round(float(v), 6) for name, v in raw.items() if math.isfinite(v)}


IMPORTANCE_COLUMNS = ("param", "importance")  # metrics/tune/importances.csv
INTERMEDIATE_COLUMNS = ("trial", "epoch", "value", "state")  # metrics/tune/intermediate.csv


def importance_rows(importances: dict[str, float]) -> list[list[Any]]:
    return [[name, value] for name, value in sorted(importances.items(), key=lambda kv: -kv[1])]


def intermediate_rows(trials: list[FrozenTrial]) -> list[list[Any]]:
    """trial, epoch, objective, final state: every value a trial reported (what the pruner saw)."""
    return [[t.number, epoch, value, t.state.name]
            for t in sorted(trials, key=lambda t: t.number)
            for epoch, value in sorted(t.intermediate_values.items())]
