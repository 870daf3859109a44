"""Registrations: what an extension currently has registered, and where from.

``sofia xmlstatus profile <p> user <user>@<domain>`` (and ``... reg``) is the
source: one ``<registration>`` per Call-ID.  Its output is not always XML:
FreeSWITCH escapes only ``<contact>`` and ``<agent>``, so a Call-ID holding
``<`` breaks well-formedness, and the "ISO-8859-1" document carries raw
UTF-8.  The parser therefore cuts the reply into ``<registration>`` blocks
and reads each field on its own: one bad row never hides the others.
"""

from __future__ import annotations

import html
import io
import re
import sys
from dataclasses import dataclass
from typing import Protocol

from .call import IPAddress, parse_ip


class LookupFailed(Exception):
    """Registrations could not be checked (switch down, timeout, garbage)."""


@dataclass(frozen=True, slots=True)
class Binding:
    """One registration (one Call-ID) of one extension."""

    user: str
    realm: str
    call_id: str
    network_ip: str
    network_port: str = ""
    profile: str = ""
    contact: str = ""
    user_agent: str = ""
    transport: str = ""
    expires_at: float | None = None  # absolute Unix time; None: unknown
    switch: str = ""

    @property
    def identity(self) -> str:
        return f"{self.user}@{self.realm}".lower()

    @property
    def address(self) -> IPAddress | None:
        return parse_ip(self.network_ip)


@dataclass(frozen=True, slots=True)
class Registrations:
    """The answer to "what has user@domain registered?"."""

    identity: str
    bindings: tuple[Binding, ...]
    source: str  # "live" (api lookup) or "cache"
    errors: tuple[str, ...] = ()  # switches that could not answer


class RegistrationSource(Protocol):
    """Where a verdict gets registrations; the cache will sit in front of live lookups."""

    def lookup(self, profile: str, user: str, domain: str) -> Registrations:
        """Fast answer (may come from the cache); raise LookupFailed when nothing can be said."""
        ...

    def lookup_live(self, profile: str, user: str, domain: str) -> Registrations:
        """Ask the switches themselves, bypassing any cache."""
        ...


# xmlstatus element -> Binding field.  Only <contact> and <agent> are
# XML-escaped by FreeSWITCH; the others are emitted raw.
_FIELDS = {
    "call-id": "call_id",
    "sip-auth-user": "user",
    "sip-auth-realm": "realm",
    "network-ip": "network_ip",
    "network-port": "network_port",
    "contact": "contact",
    "agent": "user_agent",
    "status": "status",
}
_ESCAPED = {"contact", "agent"}
_LINE = re.compile(r"<([a-z-]+)>(.*)</\1>")
_EXPSECS = re.compile(r"expsecs\((\d+)\)")
_TRANSPORT = re.compile(r"Registered\(([A-Za-z-]+)\)")
MAX_REPLY = 256 * 1024 * 1024  # a 100k-row profile answers ~75 MB


def parse_xmlstatus(reply: bytes, now: float, profile: str = "", switch: str = "") -> list[Binding]:
    """Parse a ``sofia xmlstatus ... reg|user`` reply into bindings.

    Line-based on purpose: FreeSWITCH writes one element per line and a SIP
    Call-ID cannot hold a line break, so a hostile Call-ID (``x<y>``, or one
    that spells out ``</registration><registration>...``) stays inside its
    own line and can neither hide nor forge another row.  A row with a
    repeated or missing element is dropped, not guessed at.

    Raises LookupFailed when the reply is not a registrations document at all
    (``Invalid Profile!``, ``-ERR ...``, garbage, cut short): "no
    registrations" must only ever come from a document that says so.
    """
    if len(reply) > MAX_REPLY:
        raise LookupFailed(f"xmlstatus reply of {len(reply)} bytes exceeds the limit")
    if not reply.startswith(b"<?xml") or b"\n  </registrations>\n" not in reply[-64:]:
        raise LookupFailed(f"not a complete xmlstatus registrations document: {reply[:60]!r}")
    bindings: list[Binding] = []
    row: dict[str, str] | None = None
    for raw in io.BytesIO(reply):  # lazily, line by line: a 100k-row reply is ~70 MB
        line = raw.decode("utf-8", "replace").strip()
        if line == "<registration>":
            row = {}
        elif line == "</registration>":
            binding = _binding(row, now, profile, switch) if row is not None else None
            if binding is not None:
                bindings.append(binding)
            row = None
        elif row is not None:
            _read_field(row, line)
    return bindings


def _read_field(row: dict[str, str], line: str) -> None:
    match = _LINE.fullmatch(line)
    if match is None:
        return
    tag, value = match.groups()
    if tag not in _FIELDS:
        return
    if tag in row:
        row["!duplicate"] = tag  # marks the row unusable
    row[tag] = html.unescape(value) if tag in _ESCAPED else value


def _binding(row: dict[str, str], now: float, profile: str, switch: str) -> Binding | None:
    if "!duplicate" in row or not row.get("sip-auth-user") or not row.get("network-ip"):
        return None  # a row we cannot attribute or place proves nothing
    values = {field: row.get(tag, "") for tag, field in _FIELDS.items()}
    for shared in ("realm", "user_agent", "network_port"):  # few distinct values across many rows
        values[shared] = sys.intern(values[shared])
    status = values.pop("status")
    expsecs = _EXPSECS.search(status)
    transport = _TRANSPORT.search(status)
    return Binding(
        profile=sys.intern(profile),
        switch=sys.intern(switch),
        expires_at=now + int(expsecs.group(1)) if expsecs else None,
        transport=transport.group(1).upper() if transport else "",
        **values,
    )


# --- the cache, fed by sofia events -----------------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    """What one sofia event does to the cache."""

    kind: str  # "register" | "remove"
    call_id: str
    binding: Binding | None = None


REGISTER_EVENTS = frozenset({"sofia::register"})
REMOVE_EVENTS = frozenset({"sofia::unregister", "sofia::expire"})
COUNTED_EVENTS = frozenset({"sofia::register_attempt", "sofia::register_failure", "sofia::pre_register"})
WATCHED_EVENTS = REGISTER_EVENTS | REMOVE_EVENTS | COUNTED_EVENTS


def _account(headers: dict[str, str]) -> tuple[str, str]:
    """The registered account of an event.

    ``username``/``realm`` are the digest identity, the one an INVITE's
    ``sip_auth_username@sip_auth_realm`` is compared with; ``from-user`` /
    ``from-host`` (register, unregister) and ``user``/``host`` (expire) name
    the registered account too and serve when the digest pair is missing.
    """
    user = headers.get("username") or headers.get("from-user") or headers.get("user") or ""
    realm = headers.get("realm") or headers.get("from-host") or headers.get("host") or ""
    return user, realm


def change_from_event(
    headers: dict[str, str], switch: str, now: float, expiry_margin: float
) -> Change | None:
    """Translate a sofia event; None for events that do not change the cache.

    ``expires`` in sofia::register is the granted seconds; FreeSWITCH keeps
    the row for ``sip-expires-late-margin`` more (60 s by default) and sweeps
    every ``registration-thread-frequency`` (30 s): ``expiry_margin`` covers
    both, so a binding whose sofia::expire was missed still goes away.
    """
    subclass = headers.get("Event-Subclass", "")
    call_id = headers.get("call-id", "")
    if not call_id:
        return None
    if subclass in REMOVE_EVENTS:
        return Change("remove", call_id)
    if subclass not in REGISTER_EVENTS:
        return None
    user, realm = _account(headers)
    expires = headers.get("expires", "")
    ip = headers.get("network-ip", "")
    if not user or not realm or not ip or not expires.isdigit():
        return None
    if int(expires) == 0:
        return Change("remove", call_id)
    status = headers.get("status", "")
    transport = _TRANSPORT.search(status)
    binding = Binding(
        user=user,
        realm=sys.intern(realm),
        call_id=call_id,
        network_ip=ip,
        network_port=sys.intern(headers.get("network-port", "")),
        profile=sys.intern(headers.get("profile-name", "")),
        contact=headers.get("contact", ""),
        user_agent=sys.intern(headers.get("user-agent", "")),
        transport=transport.group(1).upper() if transport else "",
        expires_at=now + int(expires) + expiry_margin,
        switch=sys.intern(switch),
    )
    return Change("register", call_id, binding)


class SwitchTable:
    """One switch's bindings: identity -> call-id -> Binding."""

    def __init__(self, bindings: list[Binding] | tuple[Binding, ...] = ()) -> None:
        self.by_identity: dict[str, dict[str, Binding]] = {}
        self.identity_of: dict[str, str] = {}  # call-id -> identity
        for binding in bindings:
            self.put(binding)

    def put(self, binding: Binding) -> None:
        self.remove(binding.call_id)  # a refresh (same Call-ID) replaces
        identity = binding.identity
        self.by_identity.setdefault(identity, {})[binding.call_id] = binding
        self.identity_of[binding.call_id] = identity

    def remove(self, call_id: str) -> bool:
        identity = self.identity_of.pop(call_id, None)
        if identity is None:
            return False
        rows = self.by_identity[identity]
        del rows[call_id]
        if not rows:
            del self.by_identity[identity]
        return True

    def apply(self, change: Change) -> None:
        if change.kind == "register" and change.binding is not None:
            self.put(change.binding)
        else:
            self.remove(change.call_id)

    def sweep(self, now: float) -> int:
        expired = [
            b.call_id
            for rows in self.by_identity.values()
            for b in rows.values()
            if b.expires_at is not None and b.expires_at <= now
        ]
        for call_id in expired:
            self.remove(call_id)
        return len(expired)

    def __len__(self) -> int:
        return len(self.identity_of)


class RegistrationCache:
    """The union of every switch's registrations, kept current by watchers.

    Each switch has its own table, replaced whole after a (re)sync, so a
    verdict never sees a half-loaded switch: building happens aside and the
    swap is one assignment (no greenlet switch can happen inside it).
    """

    def __init__(self) -> None:
        self.tables: dict[str, SwitchTable] = {}

    def replace(self, switch: str, table: SwitchTable) -> None:
        self.tables[switch] = table

    def apply(self, switch: str, change: Change) -> None:
        self.tables.setdefault(switch, SwitchTable()).apply(change)

    def bindings(self, identity: str, switches: list[str] | tuple[str, ...]) -> tuple[Binding, ...]:
        found: list[Binding] = []
        for switch in switches:
            table = self.tables.get(switch)
            rows = table.by_identity.get(identity) if table is not None else None
            if rows:
                found.extend(rows.values())
        return tuple(found)

    def size(self, switch: str) -> int:
        table = self.tables.get(switch)
        return len(table) if table is not None else 0


def parse_profiles(reply: bytes) -> list[str]:
    """Profile names from ``sofia xmlstatus`` (no arguments).

    Not captured; the format is mod_sofia.c's cmd_xml_status: one
    ``<profile>`` block per profile (again for its TLS/WS/WSS listeners) with
    ``<name>`` and ``<type>profile</type>`` on their own lines; aliases and
    gateways are other elements.
    """
    if not reply.startswith(b"<?xml") or b"</profiles>" not in reply:
        raise LookupFailed(f"not a sofia xmlstatus profile list: {reply[:60]!r}")
    names: list[str] = []
    inside = False
    for raw in io.BytesIO(reply):
        line = raw.decode("utf-8", "replace").strip()
        if line == "<profile>":
            inside = True
        elif line == "</profile>":
            inside = False
        elif inside and line.startswith("<name>") and line.endswith("</name>"):
            name = line[len("<name>") : -len("</name>")]
            if name and name not in names:
                names.append(name)
    return names
