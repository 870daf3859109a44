"""The audit table, and the record the daemon builds for each decision.

One row per decision: who called (auth user, From user, User-Agent), from
where (client IP: the source IP, or behind a trusted proxy the address in
its header; source IP and port; the IPs the extension had registered), as
which extension (auth user @ realm, domain), to what number, and what
fsguard decided and why (verdict, reason, the rule behind it, mode, where
the registrations came from, how long it took).

``record_id`` is generated when the daemon submits the row: inserts are
``ON CONFLICT (record_id) DO NOTHING``, so a spool replayed twice never
duplicates a row.  ``id`` is the insertion order.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    Uuid,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ..call import parse_ip

if TYPE_CHECKING:
    from ..guard import Decision

# Constraint names are part of the schema: migrations refer to them by name.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(TypeDecorator[datetime]):
    """``timestamptz`` on PostgreSQL; on SQLite, UTC text (SQLite has no zones).

    Aware datetimes in, aware UTC datetimes out, on both dialects: stored
    values compare (and sort) correctly as text on SQLite because they are
    all UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: audit times are timezone-aware")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# BIGINT on PostgreSQL; INTEGER on SQLite, where only INTEGER PRIMARY KEY autoincrements.
_ID = BigInteger().with_variant(Integer(), "sqlite")


class AuditDecision(Base):
    """One decision, as written by the audit writer and read by ``fsguard audit``."""

    __tablename__ = "decision"

    id: Mapped[int] = mapped_column(_ID, primary_key=True, autoincrement=True)
    record_id: Mapped[uuid.UUID] = mapped_column(Uuid, unique=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    call_uuid: Mapped[str] = mapped_column(String(64))
    switch: Mapped[str] = mapped_column(String(64))
    profile: Mapped[str] = mapped_column(String(64))
    domain: Mapped[str] = mapped_column(String(255))
    auth_user: Mapped[str] = mapped_column(String(128))
    auth_realm: Mapped[str] = mapped_column(String(255))
    from_user: Mapped[str] = mapped_column(String(128))
    destination: Mapped[str] = mapped_column(String(128))
    client_ip: Mapped[str] = mapped_column(String(64))  # the caller: source IP, or a trusted proxy's header
    source_ip: Mapped[str] = mapped_column(String(64))  # the INVITE's network peer
    source_port: Mapped[int | None] = mapped_column(Integer)
    registered_ips: Mapped[str] = mapped_column(Text)  # space-separated, sorted
    user_agent: Mapped[str] = mapped_column(String(255))
    verdict: Mapped[str] = mapped_column(String(8))
    reason: Mapped[str] = mapped_column(String(32))
    rule: Mapped[str] = mapped_column(String(32))  # differs from reason only in observe mode
    mode: Mapped[str] = mapped_column(String(16))
    lookup: Mapped[str] = mapped_column(String(16))  # live, cache, cache+live, none
    latency_us: Mapped[int] = mapped_column(Integer)
    error: Mapped[str] = mapped_column(Text)

    __table_args__ = (
        CheckConstraint("verdict IN ('allow', 'deny')", name="verdict"),
        # newest first, --since/--until, summary per day, purge
        Index(None, "at"),
        # --ip, top refused client IPs
        Index(None, "client_ip", "at"),
        Index(None, "source_ip", "at"),
        # --user (user or user@realm)
        Index(None, "auth_user", "auth_realm", "at"),
        Index(None, "domain", "at"),
        Index(None, "destination", "at"),
        # --verdict deny: refusals are few among many allows
        Index(None, "verdict", "at"),
        Index(None, "reason", "at"),
        Index(None, "call_uuid"),
    )


_INT32 = 2**31 - 1  # INTEGER columns


def _limit(name: str) -> int | None:
    try:
        return _LIMITS[name]
    except KeyError:  # looked up once per column: this runs for every field of every decision
        limit = _LIMITS[name] = getattr(AuditDecision.__table__.c[name].type, "length", None)
        return limit


_LIMITS: dict[str, int | None] = {}


def clean(value: str, limit: int | None) -> str:
    """Text as PostgreSQL will take it: no NUL, valid UTF-8, within the column's length.

    Most of these fields come from the caller (From user, User-Agent,
    destination): a hostile value must not make the insert fail.
    """
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value[:limit] if limit is not None else value


def _ip(text: str) -> str:
    address = parse_ip(text)
    return str(address) if address is not None else text.strip()


def _port(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isdigit() and int(text) <= 65535 else None


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """A decision as it will be stored; built by the daemon, never by I/O."""

    at: datetime
    call_uuid: str
    switch: str
    profile: str
    domain: str
    auth_user: str
    auth_realm: str
    from_user: str
    destination: str
    client_ip: str
    source_ip: str
    source_port: int | None
    registered_ips: str
    user_agent: str
    verdict: str
    reason: str
    rule: str
    mode: str
    lookup: str
    latency_us: int
    error: str

    @classmethod
    def from_decision(cls, decision: Decision, mode: str, switch: str, at: datetime) -> AuditRecord:
        """Pure: the record for ``decision``, decided in ``mode`` on ``switch`` at ``at``.

        ``at`` must be timezone-aware (ValueError otherwise).  Caller-supplied
        text is cleaned and cut to the column lengths.
        """
        if at.tzinfo is None:
            raise ValueError(f"naive datetime {at!r}: audit times are timezone-aware")
        call, verdict = decision.call, decision.verdict
        text = {
            "call_uuid": call.uuid,
            "switch": switch,
            "profile": call.profile,
            "domain": call.domain,
            "auth_user": call.auth_user,
            "auth_realm": call.auth_realm,
            "from_user": call.from_user,
            "destination": call.destination,
            "client_ip": _ip(verdict.client_ip or call.source_ip),
            "source_ip": _ip(call.source_ip),
            "registered_ips": " ".join(verdict.registered_ips),
            "user_agent": call.user_agent,
            "verdict": str(verdict.action),
            "reason": str(verdict.reason),
            "rule": str(verdict.rule),
            "mode": str(mode),
            "lookup": decision.lookup,
            "error": decision.error,
        }
        return cls(
            at=at.astimezone(UTC),
            source_port=_port(call.source_port),
            latency_us=min(max(0, round(decision.latency * 1_000_000)), _INT32),
            **{name: clean(value, _limit(name)) for name, value in text.items()},
        )

    def row(self, record_id: uuid.UUID) -> dict[str, Any]:
        """The column values of this record's row."""
        row = {name: getattr(self, name) for name in _RECORD_FIELDS}
        row["record_id"] = record_id
        return row


_RECORD_FIELDS = tuple(f.name for f in fields(AuditRecord))


__all__ = ["AuditDecision", "AuditRecord", "Base", "NAMING_CONVENTION", "UTCDateTime", "clean"]
