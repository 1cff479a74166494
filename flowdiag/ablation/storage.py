"""Optuna storage for ablations: heartbeats (so a killed worker's cell runs again) and, on SQLite,
transactions that take the write lock up front.

SQLAlchemy drops `SELECT ... FOR UPDATE` on SQLite, so two processes can both pop the same WAITING
trial; `BEGIN IMMEDIATE` serializes them (measured: 50 of 300 queued trials ran twice under 8
processes without it, none with it). Cells run for seconds to hours, so the lock costs nothing.

Heartbeat and grace period can be shortened through FLOWDIAG_HEARTBEAT_SECONDS and
FLOWDIAG_GRACE_SECONDS (tests, or clusters that want a killed cell back sooner).
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from datetime import datetime, timedelta
from pathlib import Path

import optuna
import sqlalchemy
import sqlalchemy.exc
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import TrialState
from sqlalchemy import event
from sqlalchemy.engine import make_url

from flowdiag.runtime.errors import UserError

HEARTBEAT_SECONDS = 5
GRACE_SECONDS = 15  # a RUNNING trial with no heartbeat for this long belonged to a killed worker
_SCHEMA_ATTEMPTS = 5


def quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")


def default_storage_url(out: Path) -> str:
    return f"sqlite:///{(out / 'study.db').resolve()}"


def display_url(url: str) -> str:
    """The URL as it may be printed: the password masked."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        return url


def _seconds(variable: str, default: int) -> int:
    text = os.environ.get(variable)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise UserError(f"{variable}={text!r}: expected a positive whole number of seconds")
    return value


def heartbeat_seconds() -> int:
    return _seconds("FLOWDIAG_HEARTBEAT_SECONDS", HEARTBEAT_SECONDS)


def grace_seconds() -> int:
    return max(_seconds("FLOWDIAG_GRACE_SECONDS", GRACE_SECONDS), heartbeat_seconds() + 1)


def make_storage(url: str, *, max_retry: int = 3, schema_checked: bool = False) -> RDBStorage:
    """An RDBStorage for `url`, or a one-line UserError saying why it cannot be used.

    schema_checked: the launcher opened this storage moments ago, with Optuna's schema check; a
    worker skips it (it loads Alembic's revision scripts: 0.15 s, measured).
    """
    quiet_optuna()
    sqlite = url.startswith("sqlite")
    engine_kwargs: dict = (
        {"connect_args": {"timeout": 60, "isolation_level": None}}
        if sqlite
        else {"connect_args": {"connect_timeout": 10}}
        if url.startswith("postgresql")
        else {}
    )
    shown = display_url(url)
    try:
        storage = _rdb_storage(url, engine_kwargs, max_retry, schema_checked)
    except ImportError as error:
        raise UserError(
            f"--storage {shown}: no database driver for it ({error.name or error}); "
            "pip install 'flowdiag[postgres]' for PostgreSQL"
        ) from None
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError, ValueError, TypeError):
        raise UserError(
            f"--storage {shown!r} is not a storage URL: use sqlite:///PATH or postgresql://USER:PASS@HOST/DB"
        ) from None
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as error:
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()
        reason_line = reason[0] if reason else type(error).__name__
        raise UserError(
            f"--storage {shown}: cannot reach it ({reason_line}); check the server and the URL"
        ) from None
    if sqlite:

        @event.listens_for(storage.engine, "begin")
        def _take_write_lock(connection: sqlalchemy.engine.Connection) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    return storage


def _rdb_storage(url: str, engine_kwargs: dict, max_retry: int, schema_checked: bool) -> RDBStorage:
    def build() -> RDBStorage:
        return RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            skip_compatibility_check=schema_checked,
            heartbeat_interval=heartbeat_seconds(),
            grace_period=grace_seconds(),
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=max_retry),
        )

    # Machines that start on a fresh database at the same moment all create Optuna's tables; all but
    # one fail on a duplicate (measured: 3 of 5 pairs on PostgreSQL; SQLite says "table ... already
    # exists", 1 of 12 pairs of processes). The tables exist by then: retry.
    for attempt in range(_SCHEMA_ATTEMPTS - 1):
        try:
            return build()
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            pass
        except sqlalchemy.exc.OperationalError as error:
            if "already exists" not in str(error):
                raise
        time.sleep(0.2 * (attempt + 1))
    return build()


def _rdb(study: optuna.Study) -> RDBStorage | None:
    storage = study._storage
    storage = getattr(storage, "_backend", storage)  # create_study wraps it in a _CachedStorage
    return storage if isinstance(storage, RDBStorage) else None


def fail_dead_trials(study: optuna.Study) -> None:
    """Fail (and so re-queue) the RUNNING trials of workers that are gone.

    Optuna's `fail_stale_trials` only sees trials with a heartbeat; a worker killed between claiming
    a trial and its first heartbeat leaves one that would stay RUNNING for ever. Such a trial is
    treated as stale once it started more than the grace period ago.
    """
    fail_stale_trials(study)
    storage = _rdb(study)
    if storage is None or storage.heartbeat_interval is None:
        return
    cutoff = datetime.now() - timedelta(seconds=grace_seconds())
    old = [
        t._trial_id
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if t.datetime_start is not None and t.datetime_start < cutoff
    ]
    if not old:
        return
    from optuna.storages._rdb.models import TrialHeartbeatModel  # no public reader for heartbeats

    query = sqlalchemy.select(TrialHeartbeatModel.trial_id).where(TrialHeartbeatModel.trial_id.in_(old))
    with storage.engine.connect() as connection:
        beating = set(connection.execute(query).scalars())
    callback = storage.get_heartbeat_stale_trial_callback()
    for trial_id in old:
        if trial_id in beating:
            continue  # Optuna's own check covers it
        try:
            failed = study._storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # it finished meanwhile, or another process failed it first
        if failed and callback is not None:
            callback(study, copy.deepcopy(study._storage.get_trial(trial_id)))
