"""The verdict: a pure function of (call, registrations, policy, now).

No sockets, no clock, no database: everything it needs is an argument, so
every branch is checked by table-driven tests.  Rules, first match wins:

====  ======================  =========================================  ==========
step  rule                    condition                                  reason
====  ======================  =========================================  ==========
1     emergency               destination is an emergency number         emergency
2     acl-trusted             no digest credentials, ACL-authorised      acl-trusted
3     no-credentials          no digest credentials                      no-credentials
4     lookup failed           registrations could not be checked         lookup-failed / timeout
                              at all                                     (verdict: on_error)
5     registered IP           source IP is one of user@domain's          registered-ip
                              unexpired registered IPs
6     partial answer          a switch did not answer (multi-switch)     lookup-failed (on_error)
7     not registered          user@domain has no live registration       not-registered (deny)
8     otherwise                                                          ip-not-registered (deny)
====  ======================  =========================================  ==========

Observe mode turns every deny into an allow with reason ``observe``; the
rule's own reason is kept in ``Verdict.rule`` for the log and the audit.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .call import CallFacts, parse_ip
from .registrations import Binding, Registrations


class Action(enum.StrEnum):
    ALLOW = "allow"
    DENY = "deny"


class Mode(enum.StrEnum):
    ENFORCE = "enforce"
    OBSERVE = "observe"
    INTERNAL_ERROR = "internal-error"


class Reason(enum.StrEnum):
    EMERGENCY = "emergency"
    ACL_TRUSTED = "acl-trusted"
    NO_CREDENTIALS = "no-credentials"
    LOOKUP_FAILED = "lookup-failed"
    TIMEOUT = "timeout"
    NOT_REGISTERED = "not-registered"
    REGISTERED_IP = "registered-ip"
    IP_NOT_REGISTERED = "ip-not-registered"
    OBSERVE = "observe"
    INTERNAL_ERROR = "internal-error"


DEFAULT_EMERGENCY_NUMBERS = ("911", "933", "112", "999", "000", "110", "119")


@dataclass(frozen=True, slots=True)
class Policy:
    mode: Mode = Mode.ENFORCE
    on_error: Action = Action.DENY
    emergency_numbers: frozenset[str] = frozenset(DEFAULT_EMERGENCY_NUMBERS)


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    reason: Reason
    rule: Reason  # the rule that decided; differs from reason only in observe mode
    registered_ips: tuple[str, ...] = field(default=())

    @property
    def allowed(self) -> bool:
        return self.action is Action.ALLOW


class Unchecked(enum.Enum):
    """Why registrations are missing: lookup failed or ran out of time."""

    LOOKUP_FAILED = Reason.LOOKUP_FAILED
    TIMEOUT = Reason.TIMEOUT


def needs_registrations(call: CallFacts, policy: Policy) -> bool:
    """Whether deciding this call requires a registration lookup.

    The daemon asks before looking up, so that emergency calls and calls
    without credentials never wait on the switch (and never fail on it).
    """
    return call.has_credentials and not is_emergency(call, policy)


def is_emergency(call: CallFacts, policy: Policy) -> bool:
    return call.destination in policy.emergency_numbers


def decide(
    call: CallFacts,
    registrations: Registrations | Unchecked | None,
    policy: Policy,
    now: float,
) -> Verdict:
    """Decide one call.  ``registrations`` is None when none were needed."""
    verdict = _rule(call, registrations, policy, now)
    if policy.mode is Mode.OBSERVE and verdict.action is Action.DENY:
        return Verdict(Action.ALLOW, Reason.OBSERVE, verdict.rule, verdict.registered_ips)
    return verdict


def _rule(
    call: CallFacts, registrations: Registrations | Unchecked | None, policy: Policy, now: float
) -> Verdict:
    if is_emergency(call, policy):
        return _verdict(Action.ALLOW, Reason.EMERGENCY)
    if not call.has_credentials:
        return _verdict(Action.ALLOW, Reason.ACL_TRUSTED if call.acl_authed_by else Reason.NO_CREDENTIALS)
    if registrations is None:
        raise ValueError("a credentialed call needs registrations to be decided")
    if isinstance(registrations, Unchecked):
        return _verdict(policy.on_error, registrations.value)
    live = _live_bindings(call, registrations.bindings, now)
    ips = tuple(sorted({b.network_ip for b in live}))
    source = call.source_address
    if source is not None and any(b.address == source for b in live):
        return _verdict(Action.ALLOW, Reason.REGISTERED_IP, ips)
    if registrations.errors:
        # A switch that did not answer may hold the matching registration.
        return _verdict(policy.on_error, Reason.LOOKUP_FAILED, ips)
    if not live:
        return _verdict(Action.DENY, Reason.NOT_REGISTERED, ips)
    return _verdict(Action.DENY, Reason.IP_NOT_REGISTERED, ips)


def _live_bindings(call: CallFacts, bindings: tuple[Binding, ...], now: float) -> list[Binding]:
    """Bindings of exactly this user@domain that have not expired."""
    return [
        b
        for b in bindings
        if b.identity == call.identity and (b.expires_at is None or b.expires_at > now)
    ]


def _verdict(action: Action, reason: Reason, ips: tuple[str, ...] = ()) -> Verdict:
    return Verdict(action, reason, reason, ips)


__all__ = [
    "Action",
    "Mode",
    "Policy",
    "Reason",
    "Unchecked",
    "Verdict",
    "decide",
    "is_emergency",
    "needs_registrations",
    "parse_ip",
]
