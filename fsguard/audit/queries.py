"""What ``fsguard audit`` asks the database: list, summary, purge.

Results are plain dicts (column name -> value) so that every output format
is a function of the same data.  "Refused" means denied, or let through
only because of observe mode (``reason = observe``): what an operator
rolling fsguard out wants to see.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, and_, delete, desc, func, literal, or_, select

from ..call import parse_ip
from .models import AuditDecision as D

PURGE_CHUNK = 10_000  # rows per DELETE: short transactions, the writer is never held up for long

# Columns of ``list``, in output order (the internal id and record id are left out).
LIST_COLUMNS = (
    "at", "verdict", "reason", "rule", "mode", "auth_user", "auth_realm", "domain", "from_user", "destination",
    "client_ip", "source_ip", "source_port", "registered_ips", "user_agent", "call_uuid", "switch", "profile",
    "lookup", "latency_us", "error",
)


@dataclass(frozen=True)
class Filters:
    """``fsguard audit`` filters; None means "any".  ``until`` is exclusive."""

    since: datetime | None = None
    until: datetime | None = None
    verdict: str | None = None
    reason: str | None = None
    domain: str | None = None
    user: str | None = None  # "1001" (any realm) or "1001@tenant-a.test"
    ip: str | None = None
    destination: str | None = None
    call: str | None = None

    def where(self) -> list[ColumnElement[bool]]:
        return [cond(value) for name, cond in _CONDITIONS.items() if (value := getattr(self, name)) is not None]


def _user(value: str) -> ColumnElement[bool]:
    user, at, realm = value.partition("@")
    return and_(D.auth_user == user, D.auth_realm == realm) if at else D.auth_user == user


def _ip(value: str) -> ColumnElement[bool]:
    """The caller's IP, or the network peer's (a proxy's): both are "from where"."""
    address = parse_ip(value)  # the writer stores normalised addresses
    text = str(address) if address is not None else value.strip()
    return or_(D.client_ip == text, D.source_ip == text)


_CONDITIONS: dict[str, Callable[[Any], ColumnElement[bool]]] = {
    "since": lambda value: D.at >= value,
    "until": lambda value: D.at < value,
    "verdict": lambda value: D.verdict == value,
    "reason": lambda value: D.reason == value,
    "domain": lambda value: D.domain == value,
    "user": _user,
    "ip": _ip,
    "destination": lambda value: D.destination == value,
    "call": lambda value: D.call_uuid == value,
}

REFUSED = or_(D.verdict == "deny", D.reason == "observe")


def list_decisions(connection: Connection, filters: Filters, limit: int) -> list[dict[str, Any]]:
    """The ``limit`` newest decisions matching ``filters``, newest first."""
    columns = [D.__table__.c[name] for name in LIST_COLUMNS]
    query = select(*columns).where(*filters.where()).order_by(desc(D.at), desc(D.id)).limit(limit)
    return [_row(row) for row in connection.execute(query)]


def summary(connection: Connection, filters: Filters, top: int = 10) -> list[dict[str, Any]]:
    """Counts by verdict and reason, top refused source IPs and extensions, counts per day.

    One dict per line, each with a ``section``: ``verdict``, ``refused_ip``,
    ``refused_extension`` or ``day``.
    """
    where = filters.where()
    count = func.count().label("count")
    extension = (D.auth_user + literal("@") + D.auth_realm).label("extension")
    day = _DAY[connection.dialect.name](D.at).label("day")
    sections = {
        "verdict": select(D.verdict, D.reason, count).where(*where).group_by(D.verdict, D.reason)
        .order_by(desc(count), D.verdict, D.reason),
        "refused_ip": select(D.client_ip.label("ip"), count).where(*where, REFUSED).group_by(D.client_ip)
        .order_by(desc(count), D.client_ip).limit(top),
        "refused_extension": select(extension, count, func.count(D.client_ip.distinct()).label("ips"))
        .where(*where, REFUSED, D.auth_user != "").group_by(D.auth_user, D.auth_realm)
        .order_by(desc(count), extension).limit(top),
        "day": select(day, D.verdict, count).where(*where).group_by(day, D.verdict).order_by(desc(day), D.verdict),
    }
    return [
        {"section": section, **_row(row)} for section, query in sections.items() for row in connection.execute(query)
    ]


def purge(connection: Connection, before: datetime, chunk: int = PURGE_CHUNK) -> int:
    """Delete the decisions older than ``before``, ``chunk`` rows per transaction; how many."""
    total = 0
    while True:
        oldest = select(D.id).where(D.at < before).limit(chunk).scalar_subquery()
        deleted = connection.execute(delete(D).where(D.id.in_(oldest))).rowcount
        connection.commit()
        total += deleted
        if deleted < chunk:
            return total


def count(connection: Connection) -> int:
    return connection.execute(select(func.count()).select_from(D)).scalar_one()


# The UTC day of a timestamp: timestamptz on PostgreSQL, UTC text on SQLite.
_DAY: dict[str, Callable[[Any], ColumnElement[str]]] = {
    "postgresql": lambda at: func.to_char(func.timezone("UTC", at), "YYYY-MM-DD"),
    "sqlite": lambda at: func.strftime("%Y-%m-%d", at),
}


def _row(row: Any) -> dict[str, Any]:
    return dict(row._mapping)


__all__ = ["Filters", "LIST_COLUMNS", "REFUSED", "count", "list_decisions", "purge", "summary"]
