"""The audit database: engines, migrations, and the daemon's schema check.

SQLite (the default, zero setup) and PostgreSQL through psycopg 3.  Alembic
is configured here, in code: the migrations ship inside the package
(``fsguard.migrations``) and no ``alembic.ini`` is needed at run time.
A URL is only ever shown through :func:`safe_url` (password hidden).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, make_url

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5  # seconds to reach PostgreSQL
SQLITE_BUSY_TIMEOUT = 5.0  # seconds SQLite waits on another process's write lock


class AuditError(Exception):
    """The audit database cannot be used as it is; the message says why and what to do."""


class DatabaseUnavailable(AuditError):
    """The audit database cannot be reached or opened."""


class SchemaBehind(AuditError):
    """The database's schema is older than this fsguard's: run ``fsguard db upgrade``."""


class SchemaUnknown(AuditError):
    """The database is at a revision this fsguard does not know (a newer fsguard migrated it)."""


def safe_url(url: str | URL) -> str:
    """The URL as it may appear in logs, errors and status: password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown as unparsable, never raw
        return "<invalid database URL>"


def describe_error(exc: BaseException, url: str | URL | None = None) -> str:
    """One line about a database error, without SQL, parameters or password."""
    orig = getattr(exc, "orig", None) or exc
    lines = str(orig).strip().splitlines() or [""]
    text = f"{type(orig).__name__}: {lines[0]}".rstrip(": ")
    if url is not None:
        password = make_url(url).password
        if password:
            text = text.replace(str(password), "***")
    return text


def normalise_url(url: str | URL) -> URL:
    """``postgresql://`` means psycopg 3 (the only PostgreSQL driver fsguard ships)."""
    url = make_url(url)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    return url


def sqlite_path(url: str | URL) -> Path | None:
    """The file of a SQLite URL; None for PostgreSQL or an in-memory SQLite."""
    url = make_url(url)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL: `fsguard audit` reads while the daemon writes; NORMAL: a commit
    # survives a crash of fsguard (not of the machine) without an fsync each.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def create_engine(url: str | URL, **options: Any) -> Engine:
    """An engine for the audit database, with timeouts on every wait."""
    url = normalise_url(url)
    if url.get_backend_name() == "sqlite":
        engine = sqlalchemy.create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT}, **options)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    connect_args = {"connect_timeout": CONNECT_TIMEOUT, "application_name": "fsguard"}
    return sqlalchemy.create_engine(url, connect_args=connect_args, pool_pre_ping=True, **options)


def migrations_path() -> Path:
    """Where the migrations are: ``fsguard.migrations`` once installed, ``migrations/`` in a checkout."""
    spec = importlib.util.find_spec("fsguard.migrations")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    checkout = Path(__file__).resolve().parents[2] / "migrations"
    if (checkout / "env.py").is_file():
        return checkout
    raise AuditError("the audit migrations are missing from this installation (fsguard.migrations)")


def alembic_config(connection: Connection | None = None) -> AlembicConfig:
    """Alembic, configured in code; env.py runs on ``connection`` when given."""
    config = AlembicConfig()
    config.set_main_option("script_location", str(migrations_path()))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    if len(heads) != 1:
        raise AuditError(f"the audit migrations have {len(heads)} heads: {', '.join(heads)}")
    return heads[0]


def current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


@contextmanager
def connect(url: str | URL, **options: Any) -> Iterator[Connection]:
    """One connection to the audit database; DatabaseUnavailable if it cannot be had."""
    engine = create_engine(url, poolclass=sqlalchemy.pool.NullPool, **options)
    try:
        try:
            connection = engine.connect()
        except sqlalchemy.exc.DBAPIError as exc:
            raise DatabaseUnavailable(
                f"cannot connect to the audit database at {safe_url(url)}: {describe_error(exc, url)}"
            ) from None
        with connection:
            yield connection
    finally:
        engine.dispose()


def upgrade(url: str | URL, revision: str = "head") -> tuple[str | None, str | None]:
    """Migrate the database at ``url`` to ``revision``; (revision before, revision after).

    A SQLite file is created, and its directory.
    """
    import alembic.command

    path = sqlite_path(url)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DatabaseUnavailable(f"cannot create the directory of {safe_url(url)}: {exc.strerror}") from None
    with connect(url) as connection:
        before = current_revision(connection)
        alembic.command.upgrade(alembic_config(connection), revision)
        connection.commit()
        return before, current_revision(connection)


def check_schema(url: str | URL, config_path: str = "FILE", create_sqlite: bool = True) -> None:
    """Raise unless the database at ``url`` is at the migrations' head.

    SchemaBehind (with the command to run) when it is older or empty,
    SchemaUnknown when a newer fsguard migrated it, DatabaseUnavailable when
    it cannot be reached.  Zero setup for the default store: a SQLite file
    that does not exist yet (or is empty) is created at head, unless
    ``create_sqlite`` is false.  Never is an existing schema upgraded here.
    """
    fix = f"run `fsguard db upgrade --config {config_path}`"
    head = head_revision()
    path = sqlite_path(url)
    if path is not None and (not path.exists() or path.stat().st_size == 0):
        if not create_sqlite:
            raise SchemaBehind(f"audit database at {safe_url(url)} does not exist, head is {head}: {fix}")
        upgrade(url)
        log.info("audit database created at %s (revision %s)", safe_url(url), head)
        return
    with connect(url) as connection:
        try:
            current = current_revision(connection)
        except sqlalchemy.exc.DBAPIError as exc:
            raise DatabaseUnavailable(
                f"cannot read the audit database at {safe_url(url)}: {describe_error(exc, url)}"
            ) from None
    if current == head:
        return
    script = ScriptDirectory.from_config(alembic_config())
    if current is not None and _unknown(script, current):
        raise SchemaUnknown(
            f"audit database at {safe_url(url)} is at revision {current}, which this fsguard does not know "
            f"(head is {head}): it was migrated by a newer fsguard"
        )
    raise SchemaBehind(f"audit database at {safe_url(url)} is at revision {current or 'none (empty)'}, "
                       f"head is {head}: {fix}")


def _unknown(script: ScriptDirectory, revision: str) -> bool:
    try:
        return script.get_revision(revision) is None
    except Exception:  # noqa: BLE001 - alembic raises several kinds for an unknown id
        return True


__all__ = [
    "AuditError",
    "DatabaseUnavailable",
    "SchemaBehind",
    "SchemaUnknown",
    "alembic_config",
    "check_schema",
    "connect",
    "create_engine",
    "current_revision",
    "describe_error",
    "head_revision",
    "migrations_path",
    "safe_url",
    "sqlite_path",
    "upgrade",
]
