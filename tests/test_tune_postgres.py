"""Three tune processes (the stage and two `--worker`s) on one study in a real PostgreSQL server.

.ci/run installs and starts PostgreSQL, creates a role and database and exports
ROUTECAST_TEST_PG_URL (no password) and ROUTECAST_DB_PASSWORD. With the URL set, or in CI
(CI=true), an unreachable server fails the test; elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from conftest import ROOT, stage_args
from routecast.config.params import load_params
from routecast.fit.study_storage import PASSWORD_ENV, driver_url, make_storage
from routecast.fit.tuning import config_from_trial
from test_tuning import tiny_project

DEFAULT_URL = "postgresql://routecast@localhost:5432/routecast_test"


@pytest.fixture
def pg_url() -> str:
    url = os.environ.get("ROUTECAST_TEST_PG_URL")
    required = bool(url) or os.environ.get("CI", "").lower() not in ("", "0", "false", "no")
    url = url or DEFAULT_URL
    password = os.environ.get(PASSWORD_ENV)
    try:
        engine = sqlalchemy.create_engine(driver_url(url), connect_args={"password": password} if password else {})
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
        engine.dispose()
    except Exception as exc:  # any failure to reach or log in
        reason = f"PostgreSQL not reachable at {url}: {str(getattr(exc, 'orig', exc)).strip().splitlines()[0]}"
        if required:
            pytest.fail(f"{reason} (.ci/run sets it up and exports ROUTECAST_TEST_PG_URL / {PASSWORD_ENV})")
        pytest.skip(f"{reason}; run .ci/run's PostgreSQL setup (or set ROUTECAST_TEST_PG_URL) to test it")
    return url


def test_three_workers_share_one_study(pg_url: str, tmp_path: Path) -> None:
    n_trials = 6
    name = f"pgtest-{uuid.uuid4().hex[:8]}"
    proj = tiny_project(tmp_path, {"tune.storage": pg_url, "tune.study_name": name, "tune.n_trials": n_trials,
                                   "tune.epochs": 2})
    cmd = [sys.executable, str(ROOT / "stages" / "tune.py"), "train.parquet", *stage_args("tune")[1:]]

    def start(*extra: str) -> subprocess.Popen:
        log = open(proj / f"log-{len(list(proj.glob('log-*')))}.txt", "w")
        return subprocess.Popen([*cmd, *extra], cwd=proj, stdout=log, stderr=subprocess.STDOUT)

    storage = make_storage(pg_url)
    procs = [start("--worker"), start("--worker")]
    try:
        # The stage joins once the workers are under way, so all three share the work.
        deadline = time.monotonic() + 120
        while not any(n.startswith(name) for n in optuna.get_all_study_names(storage)):
            assert all(p.poll() is None for p in procs), "a worker exited early"
            assert time.monotonic() < deadline, "the workers did not create the study"
            time.sleep(0.5)
        procs.append(start())
        for p in procs:
            p.wait(timeout=300)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    logs = "".join(path.read_text() for path in sorted(proj.glob("log-*.txt")))
    assert [p.returncode for p in procs] == [0, 0, 0], logs

    (study_full_name,) = [n for n in optuna.get_all_study_names(storage) if n.startswith(name)]
    study = optuna.load_study(study_name=study_full_name, storage=storage)
    try:
        trials = study.get_trials()
        numbers = [t.number for t in trials]
        assert numbers == list(range(len(trials)))  # each trial once, numbers never repeated
        with storage.engine.connect() as conn:
            dup = conn.execute(sqlalchemy.text(
                "SELECT number FROM trials WHERE study_id = :s GROUP BY number HAVING count(*) > 1"),
                {"s": study._study_id}).fetchall()
        assert dup == []
        finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        assert n_trials <= len(finished) <= n_trials + 2  # + at most one per worker racing for the last slot
        assert all(t.state.is_finished() for t in trials), [t.state for t in trials]
        origins = [t.user_attrs.get("origin") for t in trials]
        assert origins.count("baseline") == 1 and origins.count("seed_best") == 1  # enqueued once, by the creator
        pids = {p.pid for p in procs}
        ran_by = {t.user_attrs["worker"]["pid"] for t in trials}
        assert ran_by <= pids and len(ran_by) >= 2, (ran_by, pids)

        summary = json.loads((proj / "metrics" / "tune.json").read_text())
        assert summary["storage"] == pg_url and summary["n_trials"] == len(trials)
        assert summary["best_trial"] == study.best_trial.number
        params = load_params(proj / "params.yaml")
        assert params.tuned == config_from_trial(study.best_trial)
        assert params.tuned.to_plain() == summary["best_params"]
        password = os.environ.get(PASSWORD_ENV)
        if password:
            for path in [proj / "params.yaml", proj / "metrics" / "tune.json", proj / "data" / "tune" / "study.json"]:
                assert password not in path.read_text(), path
            assert password not in logs
    finally:
        optuna.delete_study(study_name=study_full_name, storage=storage)


def _service_and_pgpass(pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A service file `rc` for `pg_url`'s server and a ~/.pgpass-style file with its password;
    the environment password is removed, so only these files can log in."""
    password = os.environ.get(PASSWORD_ENV) or os.environ.get("PGPASSWORD")
    if not password:
        pytest.skip(f"needs the test database's password in {PASSWORD_ENV} to write a pgpass file")
    u = urlsplit(pg_url)
    (tmp_path / "services.conf").write_text(
        f"[rc]\nhost={u.hostname}\nport={u.port or 5432}\ndbname={u.path.lstrip('/')}\nuser={u.username}\n")
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"*:*:*:{u.username}:{password}\n")
    pgpass.chmod(0o600)  # libpq ignores a pgpass file others can read
    monkeypatch.setenv("PGSERVICEFILE", str(tmp_path / "services.conf"))
    monkeypatch.setenv("PGPASSFILE", str(pgpass))
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    monkeypatch.delenv("PGPASSWORD", raising=False)


def test_password_from_pgpass_and_settings_from_a_service_file(pg_url: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _service_and_pgpass(pg_url, tmp_path, monkeypatch)
    for url in ("postgresql:///?service=rc", pg_url):
        storage = make_storage(url)
        optuna.get_all_study_names(storage)  # logged in
        storage.engine.dispose()
    (tmp_path / "pgpass").write_text("*:*:*:nobody:wrong\n")  # the files are what logs in
    with pytest.raises(ValueError, match="cannot open the database"):
        make_storage("postgresql:///?service=rc")
