"""Tuning: pruning, samplers, resumable studies, crash safety on the journal file, bad params."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import ROOT, set_params, stage_args
from routecast.config.params import ParamsError, load_params, write_tuned
from routecast.data.features import encode_features, read_features, write_features
from routecast.data.split import split_features
from routecast.fit import tuning
from routecast.fit.study_storage import fail_dead_trials, make_storage, redact, worker_alive, worker_record
from routecast.fit.tuning import file_digest, study_name, tune
from routecast.sources.synthetic import generate

# A few sequences of an 8-layer synthetic router: a trial epoch takes a fraction of a second.
TINY = {"extract.synthetic.num_sequences": 12, "extract.synthetic.tokens_per_sequence": 48,
        "extract.synthetic.num_layers": 8, "train.threads": 1, "tune.max_train_samples": None,
        "tune.epochs": 4, "tune.pruner": "median",  # short trials, judged early: what these tests exercise
        "tune.search_space": {"mlp": None}}  # the MLP alone, at its default space


def tiny_project(dest: Path, updates: dict[str, object] | None = None) -> Path:
    """`dest/params.yaml` (the repo's, with TINY and `updates`) and `dest/train.parquet` built from it."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    set_params(dest / "params.yaml", {**TINY, **(updates or {})})
    params = load_params(dest / "params.yaml")
    traces, _ = generate(params.extract.synthetic)
    train, _ = split_features(encode_features(traces, params.features), params.split)
    write_features(dest / "train.parquet", train)
    return dest


def run_tune(project: Path, updates: dict[str, object]):
    """Run the tune library function in-process on `project` (cwd-relative journal storage)."""
    set_params(project / "params.yaml", updates)
    params = load_params(project / "params.yaml")
    cwd = os.getcwd()
    os.chdir(project)
    try:
        return params, tune(params, read_features("train.parquet"), file_digest("train.parquet"))
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_project(tmp_path_factory.mktemp("tune"))


def fresh(project: Path, tmp_path: Path) -> Path:
    """A copy of the module's tiny project with its own (empty) study storage."""
    for name in ("params.yaml", "train.parquet"):
        (tmp_path / name).write_bytes((project / name).read_bytes())
    return tmp_path


def test_hyperband_prunes_absurd_learning_rates(project: Path, tmp_path: Path) -> None:
    proj = fresh(project, tmp_path)
    _, result = run_tune(proj, {"tune.n_trials": 10, "tune.epochs": 4, "tune.pruner": "hyperband",
                                "tune.search_space.mlp.lr": {"low": 1e-5, "high": 30.0, "log": True}})
    states = [t.state for t in result.trials]
    assert states.count(TrialState.PRUNED) >= 1, states
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED) == 10
    for t in result.trials:
        if t.state == TrialState.PRUNED:
            assert len(t.intermediate_values) < 4  # stopped before the full budget
    assert result.summary["n_pruned"] == states.count(TrialState.PRUNED)
    searched = {"kind", "n_layers"} | set(result.best.config.__dataclass_fields__) | {f"units_{i}" for i in range(4)}
    assert result.importances and set(result.importances) <= searched
    assert result.summary["storage"] == "data/tune/journal.log"


@pytest.mark.parametrize("changed", ["fit/training.py", "data/features.py", "predictors/neural.py",
                                     "predictors/mixture/model.py", "predictors/gru/__init__.py", "data/batches.py",
                                     "data/__init__.py"])
def test_a_change_to_any_code_a_trial_runs_starts_a_fresh_study(changed: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The fingerprint covers every module a trial imports (the import graph), not a hand-kept list."""
    params = load_params(ROOT / "params.yaml")
    package, copy = Path(tuning.__file__).parents[1], tmp_path / "routecast"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    digest = tuning.trial_code_digest
    assert digest(copy) == digest()
    before = study_name(params, "train-digest")
    monkeypatch.setattr(tuning, "trial_code_digest", lambda: digest(copy))
    assert study_name(params, "train-digest") == before  # same code, same study
    with open(copy / changed, "a") as fh:
        fh.write("# a change\n")
    assert study_name(params, "train-digest") != before  # the old trials' values are not this code's


def test_tune_searches_across_kinds_and_writes_the_winner(project: Path, tmp_path: Path) -> None:
    """Every kind in the space runs (its starting configuration first); the best trial's kind and
    knobs come back as a ModelParams that params.yaml's `tuned:` block round-trips."""
    proj = fresh(project, tmp_path)
    params, result = run_tune(proj, {"tune.n_trials": 4, "tune.epochs": 1, "tune.pruner": "none",
                                     "tune.final_selection": False,  # the search's best trial (tested apart)
                                     "tune.search_space": {"mixture": {"num_types": {"low": 2, "high": 6}},
                                                           "gru": None, "mlp": None}})
    kinds = [t.params["kind"] for t in result.trials]
    assert kinds[:4] == ["mixture", "gru", "mlp", "mlp"]  # the starting points: one per kind, two for mlp
    best = max((t for t in result.trials if t.value is not None), key=lambda t: t.value)
    assert result.best.kind == best.params["kind"] and result.best_value == best.value
    write_tuned(result.best, proj / "params.yaml")
    assert load_params(proj / "params.yaml").tuned == result.best
    # optuna-dashboard names the objective (not "Objective 0")
    study = optuna.load_study(study_name=result.summary["study"], storage=make_storage(str(proj / result.summary[
        "storage"])))
    assert study.metric_names == ["val_top2"]


@pytest.mark.parametrize("sampler", ["gp", "random"])
def test_samplers_run_and_a_larger_n_trials_continues_the_study(sampler: str, project: Path, tmp_path: Path) -> None:
    proj = fresh(project, tmp_path)
    updates = {"tune.sampler": sampler, "tune.pruner": "none", "tune.epochs": 1}
    params, first = run_tune(proj, {**updates, "tune.n_trials": 3 if sampler == "random" else 6})
    n_first = len(first.trials)
    params, second = run_tune(proj, {"tune.n_trials": n_first + 2})
    assert second.summary["study"] == first.summary["study"]  # same fingerprint: the study grew
    assert [t.number for t in second.trials] == list(range(n_first + 2))
    assert [t.value for t in second.trials[:n_first]] == [t.value for t in first.trials]
    if sampler == "random":  # a resumed study must not redraw its first configurations
        drawn = [tuple(sorted(t.params.items())) for t in second.trials[2:]]
        assert len(set(drawn)) == len(drawn)
    else:  # past n_startup_trials the GP itself proposed
        assert second.trials[-1].state == TrialState.COMPLETE


def test_timeout_is_honoured(project: Path, tmp_path: Path) -> None:
    proj = fresh(project, tmp_path)
    start = time.monotonic()
    _, result = run_tune(proj, {"tune.n_trials": 500, "tune.epochs": 1, "tune.timeout": 1.5, "tune.pruner": "none"})
    assert 1 <= result.summary["n_complete"] < 500
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("key, value", [("tune.pruner", "successive"), ("tune.sampler", "cmaes"),
                                        ("tune.timeout", 0), ("tune.timeout", -5.0), ("tune.n_trials", 0),
                                        ("tune.storage", "postgresql://me:s3cret@db.example/routecast")])
def test_bad_tune_params_name_the_key(key: str, value: object, tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    set_params(path, {key: value})
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert err.value.key == key, str(err.value)
    assert "s3cret" not in str(err.value)


def test_redact_and_worker_liveness() -> None:
    assert redact("postgresql://me:pw@host:5432/db") == "postgresql://me:***@host:5432/db"
    assert redact("postgresql://me@host/db") == "postgresql://me@host/db"
    assert redact("data/tune/journal.log") == "data/tune/journal.log"
    assert worker_alive(worker_record(0)) is True
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = {**worker_record(0), "pid": child.pid}
    assert worker_alive(dead) is False
    assert worker_alive({**dead, "host": "elsewhere"}) is None  # another machine: unknown


def test_dead_worker_trial_is_failed_and_retried_once(tmp_path: Path) -> None:
    storage = make_storage(str(tmp_path / "journal.log"))
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    trial = study.ask()
    x = trial.suggest_float("x", 0, 1)
    trial.set_user_attr("worker", {**worker_record(trial.number), "pid": child.pid})
    live = study.ask()
    live.set_user_attr("worker", worker_record(live.number))
    assert fail_dead_trials(study, storage) == [0]
    assert fail_dead_trials(study, storage) == []  # exactly once
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING]
    assert trials[2].params == {"x": x} and trials[2].system_attrs["failed_trial"] == 0


def _study_trials(journal: Path) -> list[optuna.trial.FrozenTrial]:
    if not journal.exists():
        return []
    storage = make_storage(str(journal))
    names = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=names[0], storage=storage).get_trials() if names else []


def test_sigkill_mid_trial_then_restart_continues_the_study(project: Path, tmp_path: Path) -> None:
    proj = fresh(project, tmp_path)
    set_params(proj / "params.yaml", {"tune.n_trials": 2, "tune.epochs": 4, "tune.pruner": "none",
                                      "train.early_stopping_patience": 4})
    cmd = [sys.executable, str(ROOT / "stages" / "tune.py"), "train.parquet", *stage_args("tune")[1:]]
    journal = proj / "data" / "tune" / "journal.log"
    proc = subprocess.Popen(cmd, cwd=proj, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed_trial, deadline = None, time.monotonic() + 180
    try:
        while killed_trial is None:
            assert proc.poll() is None, f"tune ended before it could be killed:\n{proc.stderr.read()}"
            assert time.monotonic() < deadline, "no trial reached mid-training in time"
            trials = _study_trials(journal)
            done = [t for t in trials if t.state == TrialState.COMPLETE]
            mid = [t for t in trials if t.state == TrialState.RUNNING and len(t.intermediate_values) >= 1]
            if done and mid:
                os.kill(proc.pid, signal.SIGKILL)
                killed_trial = mid[0].number
            else:
                time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    before = {t.number: t for t in _study_trials(journal)}
    assert before[killed_trial].state == TrialState.RUNNING  # what a killed process leaves behind

    rerun = subprocess.run(cmd, cwd=proj, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    after = _study_trials(journal)
    numbers = [t.number for t in after]
    assert numbers == list(range(len(after)))  # unique and contiguous
    by_number = {t.number: t for t in after}
    assert by_number[killed_trial].state == TrialState.FAIL
    for number, t in before.items():
        if t.state == TrialState.COMPLETE:  # kept as they were
            assert by_number[number].state == TrialState.COMPLETE and by_number[number].value == t.value
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in after) == 2
    assert [t.system_attrs.get("failed_trial") for t in after].count(killed_trial) == 1  # retried once
    summary = json.loads((proj / "metrics" / "tune.json").read_text())
    assert summary["n_failed"] == 1 and summary["n_trials"] == len(after)
    with open(proj / "metrics" / "tune" / "intermediate.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {int(r["trial"]) for r in rows} >= {t.number for t in after if t.state == TrialState.COMPLETE}
    with open(proj / "metrics" / "tune" / "importances.csv") as fh:
        assert next(csv.reader(fh)) == ["param", "importance"]
    tuned = load_params(proj / "params.yaml").tuned
    assert tuned.to_plain() == summary["best_params"]


def test_median_pruning_compares_a_trial_with_its_own_kind_only() -> None:
    """Finished lookup_mlp trials at 0.5 by epoch 1 (it starts at the table) must not prune a GRU
    at 0.3 after its first epoch; a worse GRU than earlier GRUs is pruned."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(direction="maximize")
    dist = {"kind": optuna.distributions.CategoricalDistribution(["lookup_mlp", "gru"])}

    def finished(kind: str, values: list[float]) -> None:
        study.add_trial(optuna.trial.create_trial(params={"kind": kind}, distributions=dist, value=max(values),
                                                  intermediate_values=dict(enumerate(values, start=1))))

    for v in (0.50, 0.52, 0.51):
        finished("lookup_mlp", [v, v])
    pruner = tuning.make_pruner(dataclasses.replace(load_params(ROOT / "params.yaml").tune, pruner="median"))
    running = study.ask({"kind": dist["kind"]})
    assert running.params["kind"] in ("lookup_mlp", "gru")
    gru = optuna.trial.create_trial(params={"kind": "gru"}, distributions=dist, state=TrialState.RUNNING,
                                    intermediate_values={1: 0.30, 2: 0.31})
    assert not pruner.prune(study, gru)  # no other GRU yet: nothing to compare with
    assert optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1).prune(study, gru)  # kind-blind: pruned
    for v in (0.45, 0.46):
        finished("gru", [0.40, v])
    assert pruner.prune(study, gru)  # below the earlier GRUs at epoch 2


@pytest.mark.parametrize("value, message", [
    (4, r"tune\.objective: 4 is not a target of features\.horizons \[1, 2\]"),
    ("next_token", r"tune\.objective: next_token is not a target .* needs features\.next_token: true"),
    ({1: 0.5, 2: -1}, r"tune\.objective\.2: a weight must be > 0"),
    ({}, r"tune\.objective: an empty mix"),
    ("h2", r"tune\.objective: a target is a horizon d >= 1 of features\.horizons or next_token, got 'h2'"),
])
def test_a_bad_objective_names_the_target(value: object, message: str, tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    set_params(path, {"features.horizons": [1, 2], "tune.objective": value})
    with pytest.raises(ParamsError, match=message):
        load_params(path)


def test_the_objective_ranks_trials_by_the_targets_it_names(tmp_path: Path) -> None:
    """`tune.objective`: each trial's value is the named mix of its heads' validation figures at the
    epoch its training keeps (the main horizon's choice), the pruner sees the same mix per epoch, and
    tune.json names it; `main` (the default) is the main horizon's top-2, as before."""
    features = {"features.horizons": [1, 2], "features.next_token": True}
    proj = tiny_project(tmp_path / "mix", features)
    params, result = run_tune(proj, {"tune.n_trials": 3, "tune.epochs": 2, "tune.pruner": "none",
                                     "tune.objective": {1: 1.0, "next_token": 3.0}})
    assert params.tune.objective.weights == ((1, 0.25), (0, 0.75))
    assert result.summary["objective"] == "0.25*val_top2+0.75*val_top2_next_token"
    from routecast.fit.training import fit_predictor

    for trial in result.trials:
        config = tuning.config_from_trial(trial)
        fitted = fit_predictor(config, params.train.for_samples(True), *tuning.split_train_val(
            read_features(proj / "train.parquet")), epochs=2)
        kept = next(row for row in fitted.history if row["epoch"] == fitted.best_epoch)
        assert trial.value == pytest.approx(0.25 * kept["val_top2"] + 0.75 * kept["val_top2_next_token"], abs=1e-9)
        assert kept["val_top2_next_token"] != kept["val_top2"] and 0 < kept["val_top2_h2"] < 1
        assert set(trial.intermediate_values) == {1, 2}
    main = tiny_project(tmp_path / "main", features)
    _, plain = run_tune(main, {"tune.n_trials": 1, "tune.epochs": 2, "tune.pruner": "none"})
    assert plain.summary["objective"] == "val_top2" and plain.trials[0].value != result.trials[0].value
