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
import re
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
        """Raise LookupFailed when nothing can be said."""
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
MAX_REPLY = 64 * 1024 * 1024


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
    text = reply.decode("utf-8", "replace")
    lines = [line.strip() for line in text.splitlines()]
    if not lines or not lines[0].startswith("<?xml") or "</registrations>" not in lines:
        raise LookupFailed(f"not an xmlstatus registrations document: {text[:60]!r}")
    bindings: list[Binding] = []
    row: dict[str, str] | None = None
    for line in lines:
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
    status = values.pop("status")
    expsecs = _EXPSECS.search(status)
    transport = _TRANSPORT.search(status)
    return Binding(
        profile=profile,
        switch=switch,
        expires_at=now + int(expsecs.group(1)) if expsecs else None,
        transport=transport.group(1).upper() if transport else "",
        **values,
    )
