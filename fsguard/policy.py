"""The verdict: a pure function of (call, registrations, policy, now).

No sockets, no clock, no database: everything it needs is an argument, so
every branch is checked by table-driven tests.  The rules, in order; the
first that decides wins (README.rst "The verdict" has the same table):

====  ==================  ===================================================  =====================
step  rule                decides when                                         verdict (reason)
====  ==================  ===================================================  =====================
1     emergency           the destination is an emergency number               allow (emergency)
2     proxy               a proxy header came from a host that is not a        deny (spoofed-header)
                          trusted proxy
3     credentials         no digest credentials; ACL-authorised or not         allow (acl-trusted /
                                                                               no-credentials)
4     mode off            the domain's (or extension's) mode is ``off``        allow (guard-off)
5     scope               the call is outside the guarded scope                allow (out-of-scope)
6     identity            identity binding on, From user is neither the        deny (identity-mismatch)
                          authenticated user nor one of its aliases
7     allowlist           the client IP is in a global, domain or extension    allow (allowlisted)
                          allowlist
8     lookup              registrations could not be checked                   on_error (lookup-failed
                                                                               / timeout); over_capacity
                                                                               (over-capacity) when too
                                                                               many calls are in progress
9     registered IP       the client IP is one of user@domain's unexpired      allow (registered-ip),
                          registered IPs (TLS-only: registered over TLS);      or deny (ua-mismatch)
                          UA binding on: the User-Agent must match one of
                          those registrations
10    other family        cross_family on, and the extension is registered     allow (other-family)
                          over the other IP family
11    partial answer      a switch did not answer and no rule above allowed    on_error (lookup-failed)
12    not registered      user@domain has no (TLS-) registration               deny (not-registered)
13    otherwise           registered, but from other IPs                       deny (ip-not-registered)
====  ==================  ===================================================  =====================

Observe mode turns a deny into an allow with reason ``observe``; the rule's
own reason stays in ``Verdict.rule``.  The *client IP* is the source IP, or,
when the INVITE came from a trusted proxy, the address in its header.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .call import CallFacts, IPAddress, Network, in_networks, parse_ip
from .registrations import Binding, Registrations



class Action(enum.StrEnum):
    ALLOW = "allow"
    DENY = "deny"


class Mode(enum.StrEnum):
    ENFORCE = "enforce"
    OBSERVE = "observe"
    OFF = "off"


class Scope(enum.StrEnum):
    ALL = "all"  # every credentialed call
    OFFNET = "offnet"  # calls leaving the PBX (FusionPBX: user_exists=false / call_direction=outbound)
    PATTERNS = "patterns"  # destinations matching scope_patterns


class Reason(enum.StrEnum):
    EMERGENCY = "emergency"
    SPOOFED_HEADER = "spoofed-header"
    ACL_TRUSTED = "acl-trusted"
    NO_CREDENTIALS = "no-credentials"
    GUARD_OFF = "guard-off"
    OUT_OF_SCOPE = "out-of-scope"
    IDENTITY_MISMATCH = "identity-mismatch"
    ALLOWLISTED = "allowlisted"
    LOOKUP_FAILED = "lookup-failed"
    TIMEOUT = "timeout"
    REGISTERED_IP = "registered-ip"
    UA_MISMATCH = "ua-mismatch"
    OTHER_FAMILY = "other-family"
    NOT_REGISTERED = "not-registered"
    IP_NOT_REGISTERED = "ip-not-registered"
    OVER_CAPACITY = "over-capacity"
    OBSERVE = "observe"
    INTERNAL_ERROR = "internal-error"


DEFAULT_EMERGENCY_NUMBERS = ("911", "933", "112", "999", "000", "110", "119")


@dataclass(frozen=True, slots=True)
class Rules:
    """The rules that can differ per domain (and, for some, per extension)."""

    mode: Mode = Mode.ENFORCE
    scope: Scope = Scope.ALL
    scope_patterns: tuple[re.Pattern[str], ...] = ()
    allow_cidrs: tuple[Network, ...] = ()
    identity_binding: bool = False
    ua_binding: bool = False
    tls_only: bool = False
    cross_family: bool = False


@dataclass(frozen=True, slots=True)
class ExtensionRules:
    """Per user@domain: its own allowlist and, optionally, its own mode."""

    allow_cidrs: tuple[Network, ...] = ()
    mode: Mode | None = None


@dataclass(frozen=True, slots=True)
class Policy:
    on_error: Action = Action.DENY
    over_capacity: Action = Action.DENY
    emergency_numbers: frozenset[str] = frozenset(DEFAULT_EMERGENCY_NUMBERS)
    trusted_proxies: tuple[Network, ...] = ()
    default: Rules = Rules()
    domains: Mapping[str, Rules] = field(default_factory=dict)  # keys lower-case
    extensions: Mapping[str, ExtensionRules] = field(default_factory=dict)  # user@domain, lower-case
    global_allow_cidrs: tuple[Network, ...] = ()

    @property
    def mode(self) -> Mode:
        return self.default.mode

    def rules_for(self, domain: str) -> Rules:
        return self.domains.get(domain.lower(), self.default)


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    reason: Reason
    rule: Reason  # the rule that decided; differs from reason only in observe mode
    registered_ips: tuple[str, ...] = ()
    client_ip: str = ""
    mode: Mode = Mode.ENFORCE  # the mode in force for this call (domain / extension)

    @property
    def allowed(self) -> bool:
        return self.action is Action.ALLOW


class Unchecked(enum.Enum):
    """Why registrations are missing: lookup failed, ran out of time, or no room to look."""

    LOOKUP_FAILED = Reason.LOOKUP_FAILED
    TIMEOUT = Reason.TIMEOUT
    OVER_CAPACITY = Reason.OVER_CAPACITY


Answer = Registrations | Unchecked | None


@dataclass(frozen=True, slots=True)
class Context:
    """Everything a rule looks at, computed once per call."""

    call: CallFacts
    policy: Policy
    rules: Rules
    extension: ExtensionRules
    client: IPAddress | None
    client_text: str
    now: float

    @property
    def mode(self) -> Mode:
        return self.extension.mode or self.rules.mode


# -- the rules that need no registrations ------------------------------------


def _emergency(ctx: Context) -> Reason | None:
    return Reason.EMERGENCY if ctx.call.destination in ctx.policy.emergency_numbers else None


def _spoofed_header(ctx: Context) -> Reason | None:
    came_via_proxy = in_networks(parse_ip(ctx.call.source_ip), ctx.policy.trusted_proxies)
    return Reason.SPOOFED_HEADER if ctx.call.proxy_client_ip and not came_via_proxy else None


def _credentials(ctx: Context) -> Reason | None:
    if ctx.call.has_credentials:
        return None
    return Reason.ACL_TRUSTED if ctx.call.acl_authed_by else Reason.NO_CREDENTIALS


def _mode_off(ctx: Context) -> Reason | None:
    return Reason.GUARD_OFF if ctx.mode is Mode.OFF else None


def _out_of_scope(ctx: Context) -> Reason | None:
    return None if in_scope(ctx.call, ctx.rules) else Reason.OUT_OF_SCOPE


def _identity(ctx: Context) -> Reason | None:
    if not ctx.rules.identity_binding:
        return None
    call = ctx.call
    allowed = {call.auth_user.lower(), *(alias.lower() for alias in call.aliases)}
    return None if call.from_user.lower() in allowed else Reason.IDENTITY_MISMATCH


def _allowlisted(ctx: Context) -> Reason | None:
    lists = (ctx.policy.global_allow_cidrs, ctx.rules.allow_cidrs, ctx.extension.allow_cidrs)
    return Reason.ALLOWLISTED if any(in_networks(ctx.client, cidrs) for cidrs in lists) else None


# Each returns the reason it decides with, or None to pass the call on.
PRE_LOOKUP: tuple[tuple[Callable[[Context], Reason | None], Action], ...] = (
    (_emergency, Action.ALLOW),
    (_spoofed_header, Action.DENY),
    (_credentials, Action.ALLOW),
    (_mode_off, Action.ALLOW),
    (_out_of_scope, Action.ALLOW),
    (_identity, Action.DENY),
    (_allowlisted, Action.ALLOW),
)


def in_scope(call: CallFacts, rules: Rules) -> bool:
    if rules.scope is Scope.OFFNET:
        # FusionPBX's user_exists (order 10) says whether the destination is
        # a local extension; outbound routes export call_direction=outbound.
        return call.user_exists == "false" or call.call_direction == "outbound"
    if rules.scope is Scope.PATTERNS:
        return any(pattern.search(call.destination) for pattern in rules.scope_patterns)
    return True


# -- entry points ---------------------------------------------------------------


def context(call: CallFacts, policy: Policy, now: float) -> Context:
    client_text = call.source_ip
    if call.proxy_client_ip and in_networks(parse_ip(call.source_ip), policy.trusted_proxies):
        client_text = call.proxy_client_ip
    return Context(
        call=call,
        policy=policy,
        rules=policy.rules_for(call.auth_realm or call.domain),
        extension=policy.extensions.get(call.identity, ExtensionRules()),
        client=parse_ip(client_text),
        client_text=client_text,
        now=now,
    )


def pre_lookup(ctx: Context) -> Verdict | None:
    """The verdict when no registration lookup is needed, else None."""
    for rule, action in PRE_LOOKUP:
        reason = rule(ctx)
        if reason is not None:
            return _verdict(ctx, action, reason)
    return None


def needs_registrations(call: CallFacts, policy: Policy, now: float = 0.0) -> bool:
    """Whether deciding this call requires a registration lookup.

    The daemon asks before looking up, so that emergency calls, calls without
    credentials, out-of-scope and allowlisted calls never wait on the switch.
    """
    return pre_lookup(context(call, policy, now)) is None


def decide(call: CallFacts, registrations: Answer, policy: Policy, now: float) -> Verdict:
    """Decide one call.  ``registrations`` is None when none were needed."""
    ctx = context(call, policy, now)
    verdict = pre_lookup(ctx)
    if verdict is None:
        if registrations is None:
            raise ValueError("this call needs registrations to be decided")
        verdict = _registration_rule(ctx, registrations)
    if ctx.mode is Mode.OBSERVE and verdict.action is Action.DENY:
        return Verdict(Action.ALLOW, Reason.OBSERVE, verdict.rule, verdict.registered_ips, verdict.client_ip,
                       Mode.OBSERVE)
    return verdict


def _registration_rule(ctx: Context, answer: Registrations | Unchecked) -> Verdict:
    if isinstance(answer, Unchecked):
        action = ctx.policy.over_capacity if answer is Unchecked.OVER_CAPACITY else ctx.policy.on_error
        return _verdict(ctx, action, answer.value)
    live = _live_bindings(ctx, answer.bindings)
    ips = tuple(sorted({b.network_ip for b in live}))
    matching = [b for b in live if b.address == ctx.client] if ctx.client is not None else []
    if matching:
        if ctx.rules.ua_binding and ctx.call.user_agent not in {b.user_agent for b in matching}:
            return _verdict(ctx, Action.DENY, Reason.UA_MISMATCH, ips)
        return _verdict(ctx, Action.ALLOW, Reason.REGISTERED_IP, ips)
    if ctx.rules.cross_family and ctx.client is not None and _other_family_only(ctx.client, live):
        return _verdict(ctx, Action.ALLOW, Reason.OTHER_FAMILY, ips)
    if answer.errors:
        # A switch that did not answer may hold the matching registration.
        return _verdict(ctx, ctx.policy.on_error, Reason.LOOKUP_FAILED, ips)
    if not live:
        return _verdict(ctx, Action.DENY, Reason.NOT_REGISTERED, ips)
    return _verdict(ctx, Action.DENY, Reason.IP_NOT_REGISTERED, ips)


def _live_bindings(ctx: Context, bindings: tuple[Binding, ...]) -> list[Binding]:
    """Bindings of exactly this user@domain, unexpired, over TLS when required."""
    identity, now, tls_only = ctx.call.identity, ctx.now, ctx.rules.tls_only
    return [
        b
        for b in bindings
        if b.identity == identity
        and (b.expires_at is None or b.expires_at > now)
        and (not tls_only or b.transport == "TLS")
    ]


def _other_family_only(client: IPAddress, live: list[Binding]) -> bool:
    """The extension has no registration of the client's family, but one of the other."""
    families = {b.address.version for b in live if b.address is not None}
    return bool(families) and client.version not in families


def _verdict(ctx: Context, action: Action, reason: Reason, ips: tuple[str, ...] = ()) -> Verdict:
    return Verdict(action, reason, reason, ips, ctx.client_text, ctx.mode)
