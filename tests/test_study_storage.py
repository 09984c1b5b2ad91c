"""tune.storage and its secrets: a password anywhere in the URL is refused and never printed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc

from conftest import ROOT, set_params, stage_args
from routecast.config.params import ParamsError, load_params
from routecast.fit import study_storage
from routecast.fit.study_storage import PASSWORD_ENV, make_storage, redact, storage_problem, url_secrets

SECRET = "s3cr3t-Value"

# Every place a secret can hide in a URL the driver accepts; each carries SECRET.
SECRET_URLS = [
    f"postgresql://me:{SECRET}@db.example:5432/routecast",  # user info
    f"postgresql://me@db.example/routecast?password={SECRET}",  # libpq keyword
    f"postgresql://me@db.example/routecast?sslmode=require&sslpassword={SECRET}",  # the client key's passphrase
    f"postgresql://me@db.example/routecast?oauth_client_secret={SECRET}",
    f"postgresql://me@db.example/routecast?PASSWORD={SECRET}",
    f"postgresql://me@db.example/routecast?pass%77ord={SECRET}",  # percent-encoded key
    f"mysql://me@db.example/routecast?passwd={SECRET}",
    f"postgresql:///?service=rc&password={SECRET}",  # no host: the // must survive redaction
    f"postgresql://db.example/routecast?options=-c%20password%3D{SECRET}",  # inside another value
    f"postgresql://db.example/dbname%3Drc%20password%3D{SECRET}",  # a connection string as the database name
    f"postgresql://db.example/rc?dbname=postgresql://me:{SECRET}@other/rc",  # a URL inside a value
    f"postgresql://db.example/rc#password={SECRET}",
]

SAFE_URLS = [
    "postgresql://routecast@db.example.org/routecast",
    "postgresql:///?service=routecast",
    "postgresql://me@db.example:5432/rc?sslmode=verify-full&sslrootcert=/etc/ssl/ca.pem&passfile=/home/me/.pgpass",
    "postgresql+psycopg2://me@db.example/rc?application_name=routecast",
]


@pytest.mark.parametrize("url", SECRET_URLS)
def test_a_secret_anywhere_in_the_url_is_refused_without_repeating_it(url: str, tmp_path: Path) -> None:
    assert url_secrets(url)
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    set_params(path, {"tune.storage": url})
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert err.value.key == "tune.storage"
    message = str(err.value)
    assert SECRET not in message and "must not hold a password" in message
    # It tells what to do about the copy `dvc exp run -S` already wrote.
    assert "params.yaml" in message and "change the password" in message and PASSWORD_ENV in message


@pytest.mark.parametrize("url", SECRET_URLS)
def test_redact_removes_every_form(url: str) -> None:
    shown = redact(url)
    assert SECRET not in shown and SECRET.lower() not in shown.lower()
    assert url_secrets(shown) == []
    assert shown.split("://")[0] == url.split("://")[0]


def test_redact_keeps_what_is_not_secret() -> None:
    assert redact("postgresql://me:pw@host:5432/db") == "postgresql://me:***@host:5432/db"
    assert redact("postgresql:///?service=x&password=pw") == "postgresql:///?service=x&password=***"
    assert redact("postgresql://h/db?sslmode=require&sslpassword=pw") == "postgresql://h/db?sslmode=require&sslpassword=***"
    for url in [*SAFE_URLS, "data/tune/journal.log"]:
        assert redact(url) == url


@pytest.mark.parametrize("url", SAFE_URLS)
def test_safe_urls_pass(url: str) -> None:
    assert url_secrets(url) == [] and storage_problem(url) is None


def test_a_libpq_connection_string_is_not_taken_for_a_journal_file() -> None:
    assert "postgresql:///?service=NAME" in str(storage_problem("service=routecast"))
    assert storage_problem("host=db dbname=rc") is not None
    assert storage_problem("data/tune/journal.log") is None


@pytest.mark.parametrize("url", SECRET_URLS[:3])
def test_make_storage_refuses_a_secret_before_connecting(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def connect(*args: object, **kwargs: object) -> None:
        raise AssertionError("connected")

    monkeypatch.setattr(study_storage.optuna.storages, "RDBStorage", connect)
    with pytest.raises(ValueError, match="must not hold a password") as err:
        make_storage(url)
    assert SECRET not in str(err.value)


def test_a_database_error_never_shows_the_environment_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSWORD_ENV, SECRET)

    def failing(*args: object, engine_kwargs: dict, **kwargs: object) -> None:
        assert engine_kwargs["connect_args"] == {"password": SECRET}  # passed beside the URL
        raise sqlalchemy.exc.OperationalError("connect", {}, Exception(f"bad password {SECRET} for me"))

    monkeypatch.setattr(study_storage.optuna.storages, "RDBStorage", failing)
    with pytest.raises(ValueError, match="cannot open the database: bad password \\*\\*\\* for me") as err:
        make_storage("postgresql://me@db.example/rc")
    assert SECRET not in str(err.value)


def test_service_file_is_read_by_libpq(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`postgresql:///?service=NAME` reaches libpq, which takes host and port from the service file
    (no server needed: the error names the socket the service points at)."""
    (tmp_path / "services.conf").write_text(f"[rc]\nhost={tmp_path}/nosock\nport=59999\ndbname=rc\nuser=rc\n")
    monkeypatch.setenv("PGSERVICEFILE", str(tmp_path / "services.conf"))
    with pytest.raises(ValueError, match=r"cannot open the database: .*nosock/\.s\.PGSQL\.59999"):
        make_storage("postgresql:///?service=rc")


def test_tune_stage_refuses_a_query_password_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    set_params(tmp_path / "params.yaml", {"tune.storage": f"postgresql://me@db.example/rc?password={SECRET}"})
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / "tune.py"), "train.parquet", *stage_args("tune")[1:]],
                          cwd=tmp_path, capture_output=True, text=True, env=env)
    assert proc.returncode == 1
    assert SECRET not in proc.stdout + proc.stderr
    assert "tune.storage: must not hold a password (the query parameter password=)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


def test_a_journal_lock_held_by_a_killed_process_does_not_block(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A tune killed while appending to the journal: the next one goes on at once (with Optuna's
    symlink lock and the default relative path it waited forever)."""
    monkeypatch.chdir(tmp_path)
    storage = make_storage("data/tune/journal.log")  # relative, as tune.storage's default
    code = ("from pathlib import Path\nfrom routecast.fit.study_storage import JournalFlock\n"
            "lock = JournalFlock(Path('data/tune/journal.log'))\nlock.acquire()\nprint('held', flush=True)\n"
            "import time; time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        done = threading.Event()
        writer = threading.Thread(target=lambda: (optuna.create_study(storage=storage, study_name="s"), done.set()),
                                  daemon=True)
        writer.start()
        assert not done.wait(1.0)  # a live holder excludes our write
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        assert done.wait(5.0)  # its death releases the lock
    finally:
        holder.kill()
        holder.wait()
    assert optuna.get_all_study_names(make_storage("data/tune/journal.log")) == ["s"]
