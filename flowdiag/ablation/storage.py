"""Optuna storage for ablations: heartbeats and the recovery of dead workers' trials (through Optuna's
public API only), and on SQLite transactions that take the write lock up front.

SQLAlchemy drops `SELECT ... FOR UPDATE` on SQLite, so two processes can both pop the same WAITING
trial; `BEGIN IMMEDIATE` serializes them (measured: 50 of 300 queued trials ran twice under 8
processes without it, none with it). Cells run for seconds to hours, so the lock costs nothing.

A trial whose worker died is failed and queued again (`requeue_dead`): by Optuna's heartbeat check
once its heartbeat is stale; at once when its claim record names a process of this machine that is
gone (claims.py); and, for a worker killed between claiming a trial and writing its claim record
(before its first heartbeat, which Optuna's check never sees), once this process has watched it stay
unclaimed for the grace period. Heartbeat and grace period can be shortened through
FLOWDIAG_HEARTBEAT_SECONDS and FLOWDIAG_GRACE_SECONDS (tests, or clusters that want a killed cell
back sooner).
"""

from __future__ import annotations

import os
import time
import warnings

import optuna
import sqlalchemy
import sqlalchemy.exc
from optuna.storages import RDBStorage, fail_stale_trials
from optuna.trial import FrozenTrial, TrialState, create_trial
from sqlalchemy import event

from flowdiag.ablation.cell_states import RUN_NAME_ATTR
from flowdiag.ablation.claims import CLAIM_ATTR, worker_gone
from flowdiag.ablation.storage_url import check_storage_url, default_storage_url, display_url
from flowdiag.runtime.errors import UserError

__all__ = ["default_storage_url", "display_url", "make_storage"]

HEARTBEAT_SECONDS = 5
GRACE_SECONDS = 15  # a RUNNING trial with no heartbeat for this long belonged to a killed worker
MAX_DEATHS = 3  # a cell whose worker died this often is left failed: it may be what kills them
DEATHS_ATTR = "deaths"  # earlier attempts of the same cell or run whose worker died
# What a queued-again trial keeps of the dead one: what identifies its cell or its run folder.
IDENTITY_ATTRS = ("cell", RUN_NAME_ATTR)
_SCHEMA_ATTEMPTS = 5


def quiet_optuna() -> None:
    """Optuna's own lines off: our lines say what happened to each cell (an interrupted or failed
    cell would otherwise print a warning and a traceback per trial)."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")


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


def make_storage(url: str, *, schema_checked: bool = False) -> RDBStorage:
    """An RDBStorage for `url`, or a one-line UserError saying why it cannot be used.

    schema_checked: the launcher opened this storage moments ago, with Optuna's schema check; a
    worker skips it (it loads Alembic's revision scripts: 0.15 s, measured).
    """
    quiet_optuna()
    check_storage_url(url)
    sqlite = url.startswith("sqlite")
    engine_kwargs: dict = (
        {"connect_args": {"timeout": 60, "isolation_level": None}}
        if sqlite
        else {"connect_args": {"connect_timeout": 10}}
        if url.startswith("postgresql")
        else {}
    )
    try:
        storage = _rdb_storage(url, engine_kwargs, schema_checked)
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as error:
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()
        reason_line = reason[0] if reason else type(error).__name__
        raise UserError(
            f"--storage {display_url(url)}: cannot reach it ({reason_line}); check the server and the URL"
        ) from None
    if sqlite:

        @event.listens_for(storage.engine, "begin")
        def _take_write_lock(connection: sqlalchemy.engine.Connection) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    return storage


def _rdb_storage(url: str, engine_kwargs: dict, schema_checked: bool) -> RDBStorage:
    def build() -> RDBStorage:
        return RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            skip_compatibility_check=schema_checked,
            heartbeat_interval=heartbeat_seconds(),
            grace_period=grace_seconds(),
            heartbeat_stale_trial_callback=requeue_dead,
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


def requeue_dead(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue a dead worker's trial again: same parameters, only what identifies its cell or run
    (not the dead worker's claim, status or progress), so the new attempt resumes its checkpoint.

    Optuna's RetryHeartbeatStaleTrialCallback would copy every user attribute, the dead worker's
    claim record included, and the new attempt would look claimed by a dead process.
    """
    deaths = int(trial.user_attrs.get(DEATHS_ATTR, 0)) + 1
    kept = {k: trial.user_attrs[k] for k in IDENTITY_ATTRS if k in trial.user_attrs}
    if deaths > MAX_DEATHS or not kept:  # nothing to resume: a sampler's trial that had no cell yet
        return
    study.add_trial(
        create_trial(
            state=TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            user_attrs={**kept, DEATHS_ATTR: deaths},
        )
    )


def fail_and_requeue(study: optuna.Study, trial: FrozenTrial) -> bool:
    """Fail a RUNNING trial whose worker is gone and queue it again; False when it had ended (or
    another process failed it first)."""
    try:
        study.tell(trial.number, state=TrialState.FAIL)
    except (ValueError, RuntimeError):  # finished meanwhile: UpdateFinishedTrialError is a RuntimeError
        return False
    requeue_dead(study, trial)
    return True


class Reaper:
    """Finds the RUNNING trials of dead workers, fails them and queues them again.

    Keeps, per process, when it first saw each RUNNING trial without a claim record: one still
    without it after the grace period was claimed by a worker that died before its first heartbeat.
    Measured on this process's clock, so machines whose clocks or time zones differ agree.
    """

    def __init__(self) -> None:
        self._unclaimed_since: dict[int, float] = {}

    def sweep(self, study: optuna.Study) -> int:
        """Fail and queue again every dead worker's trial that can be told now; returns how many."""
        fail_stale_trials(study)  # Optuna's heartbeat check; its callback queues them again
        now, failed = time.monotonic(), 0
        unclaimed: dict[int, float] = {}
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            record = trial.user_attrs.get(CLAIM_ATTR)
            if record is None:
                unclaimed[trial.number] = first = self._unclaimed_since.get(trial.number, now)
                if now - first <= grace_seconds():
                    continue
            elif not worker_gone(record):
                continue
            failed += fail_and_requeue(study, trial)
        self._unclaimed_since = unclaimed
        return failed
