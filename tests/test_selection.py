"""Final selection (routecast.fit.selection): tune's pick is chosen under full training."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import torch
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from conftest import ROOT, set_params
from routecast.config.params import ModelParams, load_params
from routecast.data.features import read_features
from routecast.fit import selection, tuning
from routecast.fit.selection import cache_key, candidates, model_path, select
from routecast.fit.training import TrainResult, fit_predictor, split_train_val
from routecast.fit.tuning import file_digest, objective_value, objective_weights, tune
from routecast.predictors.checkpoints import load_checkpoint
from routecast.predictors.mixture import MixtureParams
from routecast.predictors.mlp import SEED_BASELINE, SEED_BEST
from test_tuning import fresh, project, run_tune, tiny_project  # noqa: F401  (project: the module's tiny fixture)

FAST = ModelParams("mixture", MixtureParams(num_types=4))
SLOW = ModelParams("mlp", SEED_BASELINE)


def trial(number: int, kind: str, value: float | None, origin: str | None = None,
          state: TrialState = TrialState.COMPLETE) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(
        params={"kind": kind}, distributions={"kind": CategoricalDistribution(["mixture", "mlp"])},
        value=value if state == TrialState.COMPLETE else None, state=state,
        user_attrs={"origin": origin} if origin else {})


def config_of(t: optuna.trial.FrozenTrial) -> ModelParams:
    return FAST if t.params["kind"] == "mixture" else ModelParams("mlp", SEED_BEST)


def test_finalists_are_the_best_of_each_kind_and_the_baseline_even_when_pruned() -> None:
    trials = [trial(0, "mlp", None, "baseline", TrialState.PRUNED), trial(1, "mixture", 0.43),
              trial(2, "mixture", 0.47), trial(3, "mlp", 0.30, "seed_best")]
    for number, t in enumerate(trials):
        t.number = number
    picks = candidates(trials, [("baseline", SLOW), ("seed_best", ModelParams("mlp", SEED_BEST))], config_of)
    assert [(origin, config.kind, value) for origin, config, value in picks] == [
        ("trial 2", "mixture", 0.47), ("trial 3", "mlp", 0.30), ("baseline", "mlp", None)]


def fake_fit(full: dict[str, float]):
    """fit_predictor as a table: each kind's validation top-2 under full training."""
    calls = []

    def fit(config, train, fit_part, val, epochs=None, on_epoch=None, desc=""):
        calls.append(desc)
        value = full[config.kind if config != SLOW else "baseline"]
        return TrainResult(None, [{"epoch": 7, "val_top2": value}], 7, value, 1.0)

    return fit, calls


def test_a_slow_learner_the_search_ranked_last_is_picked_under_full_training(project: Path,  # noqa: F811
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The FLAME case in miniature: at the trials' budget the mixture leads (0.47 against the
    baseline MLP's 0.27); trained in full the MLP reaches 0.72 and the mixture stays at 0.43."""
    train = read_features(project / "train.parquet")
    params = load_params(project / "params.yaml")
    params = replace(params, train=params.train.for_samples(train.meta.weighted))  # as tune resolves it
    fit, calls = fake_fit({"mixture": 0.43, "mlp": 0.35, "baseline": 0.72})
    monkeypatch.setattr(selection, "fit_predictor", fit)
    picks = [("trial 2", FAST, 0.47), ("trial 3", ModelParams("mlp", SEED_BEST), 0.30), ("baseline", SLOW, 0.27)]
    stored: dict[str, dict] = {}
    finals = select(params, train, "digest", "code", picks, {}, stored.__setitem__,
                    lambda row: objective_value(objective_weights(params), row))
    assert [(f.origin, f.value) for f in finals] == [("baseline", 0.72), ("trial 2", 0.43), ("trial 3", 0.35)]
    assert finals[0].config == SLOW and len(calls) == 3 and len(stored) == 3
    # Again with what the study kept: nothing is trained twice.
    again = select(params, train, "digest", "code", picks, dict(stored), stored.__setitem__,
                   lambda row: objective_value(objective_weights(params), row))
    assert len(calls) == 3 and [f.value for f in again] == [f.value for f in finals] and all(f.cached for f in again)
    # Another split (or code, or training params) is another key: trained afresh.
    select(params, train, "other digest", "code", picks[:1], dict(stored), stored.__setitem__,
           lambda row: objective_value(objective_weights(params), row))
    assert len(calls) == 4


def test_tune_picks_the_finalist_trained_in_full_and_records_every_one(project: Path, tmp_path: Path,  # noqa: F811
                                                                       ) -> None:
    proj = fresh(project, tmp_path)
    params, result = run_tune(proj, {"tune.n_trials": 4, "tune.epochs": 1, "tune.pruner": "none", "train.epochs": 3,
                                     "tune.search_space": {"mixture": {"num_types": {"low": 2, "high": 6}},
                                                           "mlp": None}})
    finalists = result.summary["finalists"]
    assert {f["kind"] for f in finalists} == {"mixture", "mlp"}
    assert [f["value"] for f in finalists] == sorted((f["value"] for f in finalists), reverse=True)
    assert result.best.to_plain() == result.summary["best_params"]
    # best_value is the pick's (under full training); the search's best trial keeps its own
    assert result.best_value == result.summary["best_value"] == finalists[0]["value"]
    best_trial = next(t for t in result.trials if t.number == result.summary["best_trial"])
    assert result.summary["best_trial_value"] == best_trial.value
    assert result.best.kind == finalists[0]["kind"]
    # The baseline's configuration is a finalist (its own, or the trial that ran it), and its figure
    # is what train_full gets for it: the same split, epochs and seed.
    (baseline,) = [f for f in finalists if f["params"] == SLOW.to_plain()]
    fit, val = split_train_val(read_features(proj / "train.parquet"))
    full = fit_predictor(SLOW, params.train.for_samples(fit.meta.weighted), fit, val)
    assert math.isclose(baseline["value"], full.best_value) and baseline["best_epoch"] == full.best_epoch
    assert finalists[0]["value"] >= baseline["value"]  # never below the baseline on validation
    # A resumed study (one more trial) trains only finalists it has not trained.
    params, again = run_tune(proj, {"tune.n_trials": 5})
    kept = {(f["origin"], f["value"]) for f in finalists}
    assert kept & {(f["origin"], f["value"]) for f in again.summary["finalists"]}


def run_stage(script: str, args: list[str], cwd: Path) -> None:
    """A stage's main(args) in this process, in `cwd`."""
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location(f"stage_{Path(script).stem}", ROOT / "stages" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    here = os.getcwd()
    os.chdir(cwd)
    try:
        module.main(args)
    finally:
        os.chdir(here)


def test_train_full_copies_the_finalist_tune_trained_and_it_is_the_model_training_gives(
        project: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    """Not paid twice: the baseline's configuration is a finalist, so train_full copies its model;
    trained afresh (no finalists), it is the same model, history and DVCLive summary."""
    proj = fresh(project, tmp_path)
    set_params(proj / "params.yaml", {"tune.n_trials": 2, "tune.epochs": 1, "train.epochs": 2})
    run_stage("tune.py", ["train.parquet", "--study-dir", "tune", "--metrics", "tune.json", "--live", "tune_live",
                          "--importances", "imp.csv", "--intermediate", "inter.csv", "--finalists", "finalists"], proj)
    finalists = json.loads((proj / "tune.json").read_text())["finalists"]
    assert any(f["params"] == SLOW.to_plain() for f in finalists)  # the baseline's configuration
    assert len(list((proj / "finalists").glob("*.pt"))) == len(finalists)  # one model each, nothing stale
    common = ["baseline", "--train", "train.parquet", "--params", "params.yaml"]
    with caplog.at_level("INFO", logger="routecast"):
        run_stage("train_full.py", [*common, "--out", "copied.pt", "--live", "live_copied", "--finalists", "finalists"],
                  proj)
    assert "copied (trained there in full)" in caplog.text
    run_stage("train_full.py", [*common, "--out", "trained.pt", "--live", "live_trained"], proj)
    (_, copied), (_, trained) = load_checkpoint(proj / "copied.pt"), load_checkpoint(proj / "trained.pt")
    assert copied["history"] == [{**row, "seconds": copied["history"][i]["seconds"]}
                                 for i, row in enumerate(trained["history"])]  # all but the wall time
    assert copied["state_dict"].keys() == trained["state_dict"].keys()
    assert all(torch.equal(copied["state_dict"][k], trained["state_dict"][k]) for k in copied["state_dict"])
    assert (proj / "live_copied" / "metrics.json").read_text() == (proj / "live_trained" / "metrics.json").read_text()


def test_on_a_generated_trace_tune_picks_the_slow_learner_the_search_ranked_below_the_mixture(
        tmp_path: Path) -> None:
    """No fakes: a small synthetic router with 8 token types, the mixture held to one type (so it
    cannot tell the types apart) and one-epoch trials. The search ranks the mixture first and the
    baseline's MLP last; trained in full (12 epochs) the MLP reads the type from the history and
    passes the mixture, so tune must pick it. Without final selection the same study picks the
    mixture."""
    proj = tiny_project(tmp_path, {"extract.synthetic.num_sequences": 24, "extract.synthetic.num_types": 8})
    params, result = run_tune(proj, {"tune.n_trials": 3, "tune.epochs": 1, "tune.pruner": "none", "train.epochs": 12,
                                     "tune.search_space": {"mixture": {"num_types": {"low": 1, "high": 1}},
                                                           "mlp": None}})
    searched = sorted((t for t in result.trials if t.state == TrialState.COMPLETE), key=lambda t: -t.value)
    assert searched[0].params["kind"] == "mixture"  # the search's order: the mixture leads at one epoch
    finalists = {f["origin"]: f for f in result.summary["finalists"]}
    mixture = next(f for f in finalists.values() if f["kind"] == "mixture")
    slow = finalists["baseline"]
    assert slow["trial_value"] < mixture["trial_value"]  # ranked below the mixture by the search ...
    assert slow["value"] > mixture["value"] + 0.03  # ... and well above it trained in full
    assert slow["best_epoch"] > 1  # it learns slowly: its best epoch is a late one
    assert result.best.kind == "mlp" and result.summary["finalists"][0]["value"] >= slow["value"]
    # The same study without final selection: the search's best, the mixture.
    _, before = run_tune(proj, {"tune.final_selection": False})
    assert before.best.kind == "mixture" and before.best.config.num_types == 1


def test_full_length_trials_are_their_own_finalists_and_nothing_is_trained_twice(
        project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """tune.epochs null (= train.epochs) on the whole fit part: each trial trains as train_full
    does, so final selection reads its figures and model from the trial and trains nothing; the
    model kept is the one train_full's training gives."""
    proj = fresh(project, tmp_path)
    trained = []
    monkeypatch.setattr(selection, "fit_predictor", lambda *a, **k: trained.append(a) or fit_predictor(*a, **k))
    set_params(proj / "params.yaml", {"tune.n_trials": 3, "tune.epochs": None, "tune.max_train_samples": None,
                                      "tune.pruner": "none", "train.epochs": 3,
                                      "tune.search_space": {"mixture": {"num_types": {"low": 2, "high": 6}},
                                                            "mlp": None}})
    params = load_params(proj / "params.yaml")
    train = read_features(proj / "train.parquet")
    result = tune(replace(params, tune=replace(params.tune, storage=str(proj / "journal.log"))), train,
                  file_digest(proj / "train.parquet"), finalists=proj / "finalists")
    assert trained == []  # every finalist came from its trial
    by_number = {t.number: t for t in result.trials}
    finalists = result.summary["finalists"]
    assert all(f["trial_value"] == f["value"] for f in finalists)  # the search's value is full training's
    assert all(by_number[int(f["origin"].split()[1])].value == f["value"] for f in finalists
               if f["origin"].startswith("trial "))
    assert all(len(t.intermediate_values) <= 3 for t in result.trials)  # train.epochs, early stopping included
    # The baseline's model as the trial kept it is the model training it afresh gives.
    (baseline,) = [f for f in finalists if f["params"] == SLOW.to_plain()]
    key = cache_key(SLOW, tuning.resolve_params(params, train), file_digest(proj / "train.parquet"),
                    tuning.trial_code_digest())
    _, kept = load_checkpoint(model_path(proj / "finalists", key))
    fit, val = split_train_val(train)
    fresh_run = fit_predictor(SLOW, params.train.for_samples(fit.meta.weighted), fit, val)
    assert kept["best_value"] == fresh_run.best_value == baseline["value"]
    for name, tensor in fresh_run.model.state_dict().items():
        assert torch.equal(kept["state_dict"][name], tensor), name
    # the trials' other models are pruned: one file per finalist, the baseline's among them
    assert len(list((proj / "finalists").glob("*.pt"))) == len(finalists)
