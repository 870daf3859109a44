"""Alembic environment of the audit database.

fsguard runs the migrations itself (``fsguard db upgrade``) and hands this
module an open connection in ``config.attributes["connection"]``: no
``alembic.ini`` is needed.  Developers may run the ``alembic`` command from
the repository root (``alembic.ini`` there) with ``-x url=...``.

On PostgreSQL the migration holds a transaction-scoped advisory lock (two
``fsguard db upgrade`` at once wait for each other) and gives up on table
locks after ``lock_timeout`` rather than queueing the daemon's inserts behind
it indefinitely.
"""

from __future__ import annotations

from logging.config import fileConfig
from typing import Any

from alembic import context
from sqlalchemy import text

from fsguard.audit.models import Base, UTCDateTime
from fsguard.audit.store import connect

LOCK_TIMEOUT = "10s"
ADVISORY_LOCK = "SELECT pg_advisory_xact_lock(hashtext('fsguard-alembic'))"


def render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:
    """Write the model's UTCDateTime as the plain column type it is in the database."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def run_migrations(connection: Any) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
        render_item=render_item,
        compare_type=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text(ADVISORY_LOCK))
            connection.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
        context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=Base.metadata, literal_binds=True, render_item=render_item)
    with context.begin_transaction():
        context.run_migrations()


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("no database URL: pass -x url=sqlite:///PATH (or postgresql+psycopg://...)")
    return url


def main() -> None:
    if context.config.config_file_name is not None:  # the developers' alembic.ini
        fileConfig(context.config.config_file_name, disable_existing_loggers=False)
    if context.is_offline_mode():
        run_migrations_offline()
        return
    connection = context.config.attributes.get("connection")
    if connection is not None:
        run_migrations(connection)
        return
    with connect(_url()) as connection:
        run_migrations(connection)
        connection.commit()


main()
