"""Where an Optuna study lives, and crash recovery: a journal file or a database, and the
failing (then one retry) of trials whose worker process died.

- A journal file (default `data/tune/journal.log`, persisted by DVC), for one machine.
- A database URL (`postgresql://user@host/db`, `postgresql:///?service=NAME`), for many
  workers on many machines. The password never sits in the URL (`storage_problem` refuses one
  anywhere in it): it comes from `ROUTECAST_DB_PASSWORD`, or libpq's own `PGPASSWORD`,
  `~/.pgpass` or service file, so it reaches neither params.yaml, dvc.lock, logs nor metrics.

A process that dies mid-trial leaves a RUNNING trial: on a database Optuna's heartbeat fails it
after `GRACE_PERIOD`; on either storage a trial whose recorded worker process (host, boot, pid,
start time) is gone is failed at once by the next process that looks. Either way the failed
configuration is retried once as a new trial, so completed trials are kept and trial numbers
(assigned by the storage) never repeat.
"""

from __future__ import annotations

import datetime
import fcntl
import logging
import os
import re
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import optuna
from optuna.trial import FrozenTrial, TrialState

from routecast.errors import InputError
from routecast.pipeline import procs

log = logging.getLogger(__name__)

PASSWORD_ENV = "ROUTECAST_DB_PASSWORD"
HEARTBEAT_INTERVAL = 20  # seconds between a running trial's heartbeats on a database
GRACE_PERIOD = 60  # a database trial with no heartbeat for this long is failed
UNOWNED_GRACE = 120  # file store: a RUNNING trial that never recorded its worker is failed after this
WORKER_ATTR = "worker"  # user attr: the process running the trial


# --------------------------------------------------------------------------- storage


def is_database_url(storage: str) -> bool:
    return "://" in storage


REDACTED = "***"
# A connection parameter that carries a secret: libpq's password, sslpassword and
# oauth_client_secret, MySQL's passwd, ODBC's pwd. Not passfile (a path: a safe way).
_SECRET_KEY = re.compile(r"pass(word|wd)|^pwd$|secret", re.IGNORECASE)
# The same inside a value (a libpq connection string as the database name, `options`, ...).
_SECRET_SETTING = re.compile(r"(pass(word|wd)|\bpwd|secret)\w*\s*=|://[^/@\s]*:[^/@\s]*@", re.IGNORECASE)
# A libpq connection string (`service=name`, `host=h dbname=d`) where a URL or a path belongs.
_CONNINFO = re.compile(r"^\s*\w+\s*=")


def url_secrets(url: str) -> list[str]:
    """Where the database URL `url` carries a secret, in words that never repeat it; [] if nowhere.

    Values equal to `REDACTED` do not count, so `url_secrets(redact(url)) == []`.
    """
    parts = urlsplit(url)
    found = []
    if parts.password not in (None, REDACTED):
        found.append("a password after the user name (user:PASSWORD@host)")
    rest = [parts.path, parts.fragment]
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if _SECRET_KEY.search(key):
            if value != REDACTED:
                found.append(f"the query parameter {key}=")
        else:
            rest.append(value)
    if any(_SECRET_SETTING.search(unquote(text)) for text in rest):
        found.append("a password setting inside the database name or a query parameter's value")
    return found


def storage_problem(storage: str) -> str | None:
    """Why `storage` (tune.storage) is refused, in words that never repeat a secret; None if fine."""
    if not is_database_url(storage):
        if _CONNINFO.match(storage):
            return ("looks like a libpq connection string, which would be taken for a journal file name; "
                    "write it as a URL, e.g. postgresql:///?service=NAME")
        return None
    try:
        found = url_secrets(storage)
    except ValueError:
        return "not a valid database URL (scheme://user@host:port/database?parameter=value)"
    if not found:
        return None
    return (f"must not hold a password ({'; '.join(found)}): it would reach dvc.lock, logs and metrics. "
            "If `dvc exp run -S` set it, DVC has already written it into params.yaml: take it out "
            "(`git checkout params.yaml`) and change the password, since it has been on disk (after --queue or "
            "--temp, also purge DVC's and Git's copies: docs/tuning.md, \"Passwords\"). "
            f"Give it through {PASSWORD_ENV}, ~/.pgpass or a service file (postgresql:///?service=NAME)")


def redact(storage: str) -> str:
    """`storage` fit for logs, errors and metrics: every secret in a URL becomes `REDACTED`.

    The user-info password and secret query parameters are cut out one by one; a secret found
    anywhere else (inside the database name, say) takes the whole path and query with it.
    """
    if not is_database_url(storage):
        return storage
    try:
        if not url_secrets(storage):
            return storage
        parts = urlsplit(storage)
        netloc = parts.netloc
        if parts.password is not None:
            userinfo, host = netloc.rsplit("@", 1)
            netloc = f"{userinfo.split(':', 1)[0]}:{REDACTED}@{host}"
        query = "&".join(f"{pair.split('=', 1)[0]}={REDACTED}" if _SECRET_KEY.search(unquote(pair.split("=", 1)[0]))
                         else pair for pair in parts.query.split("&"))
        # Built by hand: urlunsplit drops the `//` of an empty host (postgresql:///?service=x).
        redacted = f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "") + \
            (f"#{parts.fragment}" if parts.fragment else "")
        if not url_secrets(redacted):
            return redacted
        return f"{parts.scheme}://{netloc}/{REDACTED}"
    except ValueError:
        return f"{storage.split('://', 1)[0]}://{REDACTED}"


def driver_url(storage: str) -> str:
    """`postgresql://` with the driver installed: SQLAlchemy 2.1 defaults to psycopg 3, the
    project pins psycopg2-binary; an explicit `postgresql+driver://` is kept as written."""
    scheme, rest = storage.split("://", 1)
    if scheme == "postgresql":
        import importlib.util

        if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
            return f"postgresql+psycopg2://{rest}"
    return storage


def make_storage(storage: str) -> optuna.storages.BaseStorage:
    """A journal file for a path, an `RDBStorage` with heartbeats for a database URL."""
    problem = storage_problem(storage)
    if problem:
        raise InputError(f"tune.storage {redact(storage)}: {problem}")
    if not is_database_url(storage):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(storage)
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFlock(path)))

    import sqlalchemy.exc

    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    password = os.environ.get(PASSWORD_ENV)
    if password and urlsplit(storage).scheme.startswith("postgresql"):
        # Passed to psycopg2 beside the URL, so the URL Optuna and SQLAlchemy log stays password-free.
        engine_kwargs["connect_args"] = {"password": password}
    for attempt in range(3):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    driver_url(storage), engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_INTERVAL,
                    grace_period=GRACE_PERIOD, heartbeat_stale_trial_callback=retry_callback())
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            # Workers starting together on an empty database race to create Optuna's tables.
            if attempt == 2:
                raise
            time.sleep(1.0 + attempt)
        except (sqlalchemy.exc.SQLAlchemyError, ImportError) as exc:
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            if password:
                reason = reason.replace(password, REDACTED)
            raise InputError(f"tune.storage {redact(storage)}: cannot open the database: {reason}") from None
    raise AssertionError("unreachable")


class JournalFlock:
    """The journal's write lock, an flock(2) on the journal file itself: the kernel releases it
    when its process dies, so a tune killed while appending never blocks the next one.

    (Optuna's default lock is a symlink that a killed process leaves behind; it is found stale
    only after a grace period, and never when the journal path is relative, as `tune.storage`'s
    default is: the link dangles, and the next tune waited forever.) Every routecast process
    takes this lock; another tool writing to the same journal at the same time is not excluded.
    """

    def __init__(self, journal: Path) -> None:
        self._journal = journal
        self._fh: Any = None

    def acquire(self) -> bool:
        fh = open(self._journal, "ab")
        fcntl.flock(fh, fcntl.LOCK_EX)
        self._fh = fh
        return True

    def release(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()


def retry_callback() -> Callable[[optuna.Study, FrozenTrial], None]:
    """A trial whose worker died is re-run once (as a new trial with the same parameters)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)


# --------------------------------------------------------------------------- dead workers


def worker_record(trial_number: int) -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot": procs.boot_id(), "pid": pid, "start": procs.start_ticks(pid),
            "trial": trial_number}


def worker_alive(record: dict[str, Any]) -> bool | None:
    """True / False for a process on this machine; None (unknown) for one elsewhere."""
    if record.get("host") != socket.gethostname() or record.get("boot") != procs.boot_id():
        return None
    return procs.is_running(int(record["pid"]), record.get("start"))


def fail_dead_trials(study: optuna.Study, storage: optuna.storages.BaseStorage) -> list[int]:
    """Fail RUNNING trials whose worker is gone, retry each once; return the failed trial numbers.

    The file store has no heartbeat, so this is how a killed `tune` is cleaned up on restart. A
    retried trial carries its predecessor's user attrs; the `trial` field of the worker record
    tells them apart, so a retry never looks dead before its own worker records itself.
    """
    failed = []
    now = datetime.datetime.now()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        record = trial.user_attrs.get(WORKER_ATTR)
        if isinstance(record, dict) and record.get("trial") == trial.number:
            if worker_alive(record) is not False:
                continue
        elif is_database_url_storage(storage) or trial.datetime_start is None or \
                (now - trial.datetime_start).total_seconds() < UNOWNED_GRACE:
            continue  # still starting up (or a database: its heartbeat decides)
        try:
            if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process got there first
        log.warning("trial %d: its worker %s is gone; marked FAIL, retrying its parameters once", trial.number,
                    _describe(record))
        failed.append(trial.number)
        retry_callback()(study, storage.get_trial(trial._trial_id))
    return failed


def is_database_url_storage(storage: optuna.storages.BaseStorage) -> bool:
    return isinstance(storage, optuna.storages.RDBStorage)


def _describe(record: Any) -> str:
    if not isinstance(record, dict):
        return "(never recorded)"
    return f"{record.get('host')}:{record.get('pid')}"
