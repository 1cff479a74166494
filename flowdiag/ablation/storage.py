"""Optuna storage for ablations: heartbeats (so a killed worker's cell runs again) and, on SQLite,
transactions that take the write lock up front.

SQLAlchemy drops `SELECT ... FOR UPDATE` on SQLite, so two processes can both pop the same WAITING
trial; `BEGIN IMMEDIATE` serializes them (measured: 50 of 300 queued trials ran twice under 8
processes without it, none with it). Cells run for seconds to hours, so the lock costs nothing.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
import sqlalchemy.exc
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from sqlalchemy import event

from flowdiag.errors import UserError

HEARTBEAT_SECONDS = 5
GRACE_SECONDS = 15  # a RUNNING trial with no heartbeat for this long belonged to a killed worker


def quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")


def default_storage_url(out: Path) -> str:
    return f"sqlite:///{(out / 'study.db').resolve()}"


def make_storage(url: str, *, max_retry: int = 3) -> RDBStorage:
    """An RDBStorage for `url`, or a one-line UserError saying why it cannot be used."""
    quiet_optuna()
    sqlite = url.startswith("sqlite")
    engine_kwargs: dict = (
        {"connect_args": {"timeout": 60, "isolation_level": None}}
        if sqlite
        else {"connect_args": {"connect_timeout": 10}} if url.startswith("postgresql") else {}
    )
    try:
        storage = RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=HEARTBEAT_SECONDS,
            grace_period=GRACE_SECONDS,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=max_retry),
        )
    except ImportError as error:
        raise UserError(f"--storage {url}: no database driver for it ({error.name or error}); "
                        "pip install 'flowdiag[postgres]' for PostgreSQL") from None
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError, ValueError):
        raise UserError(f"--storage {url!r} is not a storage URL: use sqlite:///PATH or "
                        "postgresql://USER:PASS@HOST/DB") from None
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as error:
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
        raise UserError(f"--storage {url}: cannot reach it ({reason}); check the server and the URL") from None
    if sqlite:

        @event.listens_for(storage.engine, "begin")
        def _take_write_lock(connection) -> None:  # noqa: ANN001 - SQLAlchemy's signature
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    return storage
