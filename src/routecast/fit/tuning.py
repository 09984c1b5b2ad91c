"""Bayesian search (Optuna) over the seed's search space, objective = validation top-2.

The study is named after a fingerprint of everything that changes a trial's value (the train
split, the search space, the per-trial budget), so a re-run with a larger `n_trials` continues
the same study while a change of data starts a new one. It lives in `tune.storage` (a journal
file or a database URL: see `routecast.fit.study_storage`, which also fails and retries the trials
of workers that died).

Each trial reports validation top-2 after every epoch, so the pruner (Hyperband by default) can
stop a hopeless configuration early.

Every process (the `tune` stage and any `--worker`) starts a trial only while the study holds
fewer than `n_trials` finished (complete or pruned) plus running trials; the stage then waits
for the other workers' trials, so the study ends with `n_trials` finished trials (one more per
worker that raced for the last slot at the same instant).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from routecast.pipeline.codegraph import SOURCE, code_digest
from routecast.data.features import Features
from routecast.config.params import ModelParams, Params, SearchSpace, TuneParams
from routecast.fit.study_storage import WORKER_ATTR, fail_dead_trials, make_storage, redact, worker_record
from routecast.fit.training import fit_predictor, objective_name, split_train_val

log = logging.getLogger(__name__)

POLL_SECONDS = 2.0  # how often the stage checks on other workers' trials
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# The seed's best configuration: with `baseline`, the first two trials of every new study.
SEED_BEST = ModelParams(lr=0.000536, layer_emb=5, expert_emb=7, architecture=[512, 512], dropout=0.18)


# --------------------------------------------------------------------------- search space


def suggest_config(trial: optuna.Trial, space: SearchSpace, base: ModelParams) -> ModelParams:
    """A configuration of one of `space.kind`; the knobs a kind does not use keep `base`'s values."""
    kind = trial.suggest_categorical("kind", space.kind)
    if kind == "mixture":
        mixture = dataclasses.replace(
            base.mixture,
            num_types=trial.suggest_int("num_types", space.mixture.num_types.low, space.mixture.num_types.high),
            smoothing=trial.suggest_float("smoothing", space.mixture.smoothing.low, space.mixture.smoothing.high,
                                          log=space.mixture.smoothing.log))
        return dataclasses.replace(base, kind=kind, mixture=mixture)
    config = dataclasses.replace(
        base, kind=kind, lr=trial.suggest_float("lr", space.lr.low, space.lr.high, log=space.lr.log),
        dropout=trial.suggest_float("dropout", space.dropout.low, space.dropout.high, log=space.dropout.log))
    if kind == "gru":
        gru = dataclasses.replace(base.gru, hidden=trial.suggest_int("hidden", *space.gru.hidden[:2],
                                                                     step=space.gru.hidden[2]),
                                  emb=trial.suggest_int("gru_emb", *space.gru.emb[:2], step=space.gru.emb[2]))
        return dataclasses.replace(config, gru=gru)
    n_layers = trial.suggest_int("n_layers", space.n_layers.low, space.n_layers.high)
    low, high, step = space.units.first
    units = [trial.suggest_int("units_0", low, high, step=step)]
    for i in range(1, n_layers):
        low, high, step = space.units.later
        # Each later layer is at most as wide as the one before.
        units.append(trial.suggest_int(f"units_{i}", low, max(low, min(high, units[-1])), step=step))
    return dataclasses.replace(
        config, architecture=units,
        layer_emb=trial.suggest_int("layer_emb", space.layer_emb.low, space.layer_emb.high),
        expert_emb=trial.suggest_int("expert_emb", space.expert_emb.low, space.expert_emb.high))


def trial_params(config: ModelParams) -> dict[str, Any]:
    """The Optuna parameters that `suggest_config` maps to `config` (for enqueueing)."""
    if config.kind == "mixture":
        return {"kind": "mixture", "num_types": config.mixture.num_types, "smoothing": config.mixture.smoothing}
    params: dict[str, Any] = {"kind": config.kind, "lr": config.lr, "dropout": config.dropout}
    if config.kind == "gru":
        return {**params, "hidden": config.gru.hidden, "gru_emb": config.gru.emb}
    params.update({"n_layers": len(config.architecture), "layer_emb": config.layer_emb,
                   "expert_emb": config.expert_emb})
    params.update({f"units_{i}": u for i, u in enumerate(config.architecture)})
    return params


def config_from_trial(trial: FrozenTrial, base: ModelParams) -> ModelParams:
    """The configuration a finished trial ran (`base` for the knobs its kind does not use)."""
    p = trial.params
    kind = p.get("kind", "mlp")
    if kind == "mixture":
        return dataclasses.replace(base, kind=kind, mixture=dataclasses.replace(
            base.mixture, num_types=int(p["num_types"]), smoothing=float(p["smoothing"])))
    config = dataclasses.replace(base, kind=kind, lr=float(p["lr"]), dropout=float(p["dropout"]))
    if kind == "gru":
        return dataclasses.replace(config, gru=dataclasses.replace(base.gru, hidden=int(p["hidden"]),
                                                                   emb=int(p["gru_emb"])))
    return dataclasses.replace(config, layer_emb=int(p["layer_emb"]), expert_emb=int(p["expert_emb"]),
                               architecture=[int(p[f"units_{i}"]) for i in range(int(p["n_layers"]))])


def starting_points(params: Params) -> list[tuple[str, ModelParams]]:
    """The configurations every new study runs first, one or two per kind it searches: the
    baseline and the seed's best MLP, and each other kind at its defaults (clipped to the space)."""
    space, base = params.tune.search_space, params.baseline
    points = []
    for kind in space.kind:
        if kind == "mlp":
            points += [("baseline", dataclasses.replace(base, kind="mlp")), ("seed_best", SEED_BEST)]
        elif kind == "mixture":
            mixture = dataclasses.replace(base.mixture, num_types=_clip(32, space.mixture.num_types),
                                          smoothing=_clip(0.1, space.mixture.smoothing))
            points.append(("mixture_default", dataclasses.replace(base, kind=kind, mixture=mixture)))
        elif kind == "gru":
            gru = dataclasses.replace(base.gru, hidden=_clip(128, space.gru.hidden), emb=_clip(32, space.gru.emb))
            points.append(("gru_default", dataclasses.replace(base, kind=kind, lr=_clip(3e-3, space.lr),
                                                              dropout=_clip(0.3, space.dropout), gru=gru)))
        else:
            points.append((f"{kind}_default", dataclasses.replace(SEED_BEST, kind=kind)))
    return [(origin, config) for origin, config in points if _inside(config, space)]


def _clip(value: float, span: Any) -> Any:
    """`value` inside a range: a FloatRange / IntRange, or [low, high, step] (snapped to the step)."""
    if isinstance(span, list):
        low, high, step = span
        return int(min(max(low + round((value - low) / step) * step, low), low + (high - low) // step * step))
    return type(span.low)(min(max(value, span.low), span.high))


def _inside(config: ModelParams, space: SearchSpace) -> bool:
    """Whether `suggest_config` can reach `config` (an enqueued trial outside the space would fail)."""
    if config.kind == "mixture":
        return True  # clipped above
    if not (space.lr.low <= config.lr <= space.lr.high and space.dropout.low <= config.dropout <= space.dropout.high):
        return False
    if config.kind == "gru":
        return True  # clipped above
    first, later = space.units.first, space.units.later
    return (space.n_layers.low <= len(config.architecture) <= space.n_layers.high
            and first[0] <= config.architecture[0] <= first[1]
            and all(later[0] <= u <= later[1] for u in config.architecture[1:])
            and space.layer_emb.low <= config.layer_emb <= space.layer_emb.high
            and space.expert_emb.low <= config.expert_emb <= space.expert_emb.high)


def trial_code_digest(source: Path = SOURCE) -> str:
    """The code a trial runs (the tuning module and everything it imports, from the source): a change
    to any of it starts a fresh study instead of reusing values the new code would not give."""
    return code_digest(["routecast.fit.tuning"], source)


def study_fingerprint(params: Params, train_digest: str) -> str:
    """Everything that changes a trial's value; not n_trials or timeout, so a study can grow."""
    tune = params.tune
    key = {"train": train_digest, "space": asdict(tune.search_space), "epochs": tune.epochs,
           "max_train_samples": tune.max_train_samples, "seed": tune.seed,
           # train.epochs is full training's budget, not a trial's (tune.epochs is).
           "train_params": {k: v for k, v in asdict(params.train).items() if k != "epochs"},
           "code": trial_code_digest()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


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
        return [t for t in self._study.get_trials(deepcopy=deepcopy, states=states) if t.params.get("kind") == self._kind]


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
        for origin, config in starting_points(params):
            study.enqueue_trial(trial_params(config), user_attrs={"origin": origin})
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, pruner=make_pruner(params.tune))
    n_existing = len(study.get_trials(deepcopy=False))
    if seed is None:
        seed = params.tune.seed if n_existing == 0 else derived_seed(params.tune.seed, n_existing)
    study.sampler = make_sampler(params.tune, seed)
    return study, storage


def make_objective(params: Params, fit: Features, val: Features) -> Callable[[optuna.Trial], float]:
    objective_key = objective_name(params.train.target)

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr(WORKER_ATTR, worker_record(trial.number))
        config = suggest_config(trial, params.tune.search_space, params.baseline)

        def report(epoch: int, row: dict[str, float]) -> None:
            if epoch == 0:
                return  # lookup_mlp's table before training: no resource spent, nothing to prune on
            trial.report(row[objective_key], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {epoch}: {objective_key} {row[objective_key]:.4f}")

        result = fit_predictor(config, params.train, fit, val, epochs=params.tune.epochs, on_epoch=report,
                               desc=f"trial {trial.number} ({config.kind})")
        return result.best_value

    return objective


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
         on_trial: Callable[[FrozenTrial], None] | None = None) -> TuneResult:
    """The `tune` stage: run (and wait for) trials until the study is done, then summarise it.
    `on_trial` sees each trial this process finishes (e.g. to log it)."""
    start = time.perf_counter()
    _quiet_optuna()
    fit, val = split_train_val(train, params.tune.max_train_samples, seed=params.tune.seed)
    study, storage = open_study(params, train_digest)
    finished = sum(t.state in FINISHED for t in study.get_trials(deepcopy=False))
    log.info("study %s on %s: %d of %d trials finished; %s sampler, %s pruner, %d train / %d validation samples",
             study.study_name, redact(params.tune.storage), finished, params.tune.n_trials, params.tune.sampler,
             params.tune.pruner, len(fit), len(val))
    if on_trial is not None:  # a resumed study: its earlier trials first, so a log of them is whole
        for trial in sorted(study.get_trials(deepcopy=False, states=FINISHED), key=lambda t: t.number):
            on_trial(trial)
    ran = run_trials(study, storage, make_objective(params, fit, val), params.tune, wait_for_others=True,
                     on_trial=on_trial)
    trials = study.get_trials(deepcopy=True)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        raise RuntimeError(f"study {study.study_name}: no trial completed; see the log above")
    best = study.best_trial
    importances = param_importances(study, params.tune.seed)
    counts = {state: sum(t.state == state for t in trials) for state in TrialState}
    summary = {
        "best_value": best.value,
        "best_trial": best.number,
        "best_params": asdict(config_from_trial(best, params.baseline)),
        "objective": objective_name(params.train.target),
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
    log.info("study %s: best trial %d, val top-2 %.4f (%d complete, %d pruned, %d failed; %d run here)",
             study.study_name, best.number, best.value, summary["n_complete"], summary["n_pruned"],
             summary["n_failed"], ran)
    return TuneResult(config_from_trial(best, params.baseline), best.value, summary, trials, importances)


def tune_worker(params: Params, train: Features, train_digest: str) -> int:
    """Join the study from another process or machine; return how many trials this worker ran.

    The worker's sampler seed comes from its host and pid, so workers do not propose the same
    configurations in lockstep.
    """
    _quiet_optuna()
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


def importance_rows(importances: dict[str, float]) -> list[list[Any]]:
    return [[name, value] for name, value in sorted(importances.items(), key=lambda kv: -kv[1])]


def intermediate_rows(trials: list[FrozenTrial]) -> list[list[Any]]:
    """trial, epoch, val top-2, final state: every value a trial reported (what the pruner saw)."""
    return [[t.number, epoch, value, t.state.name]
            for t in sorted(trials, key=lambda t: t.number)
            for epoch, value in sorted(t.intermediate_values.items())]
