"""The `--storage` URL: its default, how it is printed, and the checks that need no database.

Kept free of optuna and torch, so a bad URL or a missing driver is refused before either is
imported (a second or more). SQLAlchemy is imported only when a URL is given.
"""

from __future__ import annotations

from pathlib import Path

from flowdiag.runtime.errors import UserError

URL_FORMS = "use sqlite:///PATH or postgresql://USER:PASS@HOST/DB"
# What `pip install 'flowdiag[postgres]'` installs: the driver SQLAlchemy 2 picks for postgresql://.
POSTGRES_EXTRA_DRIVER = "psycopg"


def default_storage_url(out: Path) -> str:
    return f"sqlite:///{(out / 'study.db').resolve()}"


def display_url(url: str) -> str:
    """The URL as it may be printed: the password masked."""
    if "@" not in url:  # nothing to mask: no need to import SQLAlchemy
        return url
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return url


def check_storage_url(url: str) -> None:
    """Refuse a URL SQLAlchemy cannot parse, or whose database driver is not installed."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    shown = display_url(url)
    try:
        dialect = make_url(url).get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError, TypeError):
        raise UserError(f"--storage {shown!r} is not a storage URL: {URL_FORMS}") from None
    try:
        dialect.import_dbapi()
    except ImportError as error:
        raise UserError(missing_driver(shown, dialect.name, dialect.driver, error.name)) from None


def missing_driver(shown: str, database: str, driver: str, module: str | None) -> str:
    """One line naming the module that is missing and what installs it.

    SQLAlchemy 2 maps postgresql:// to psycopg (3); postgresql+psycopg2:// to psycopg2. The hint
    names the driver the URL really asks for, not the one an extra happens to install.
    """
    missing = (
        f"--storage {shown}: SQLAlchemy reaches {database} through {driver}, "
        f"and module {module!r} is not installed"
    )
    if database == "postgresql" and driver == POSTGRES_EXTRA_DRIVER:
        return f"{missing}; pip install 'flowdiag[postgres]'"
    if database == "postgresql":
        return (
            f"{missing}; pip install {driver}-binary, or drop '+{driver}' from the URL and "
            "pip install 'flowdiag[postgres]'"
        )
    return f"{missing}; pip install the package that provides {module!r}"
