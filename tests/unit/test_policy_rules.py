"""Policy rules (scopes, allowlists, proxies, identity, UA, TLS, IPv6, per domain), table-driven."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fsguard.call import CallFacts
from fsguard.policy import (
    Action,
    ExtensionRules,
    Mode,
    Policy,
    Reason,
    Rules,
    Scope,
    Unchecked,
    decide,
    needs_registrations,
)
from fsguard.registrations import Binding, Registrations

NOW = 1_800_000_000.0
R, A, D = Reason, Action.ALLOW, Action.DENY
net = ipaddress.ip_network
PROXY = net("192.0.2.5/32")

CALL = CallFacts(uuid="u", source_ip="127.0.0.20", auth_user="1001", auth_realm="tenant-a.test",
                 destination="00442030001234", from_user="1001", user_agent="Yealink T46S",
                 aliases=("101",), call_direction="outbound", user_exists="false")


def b(ip, ua="Yealink T46S", transport="UDP", call_id=None):
    return Binding(user="1001", realm="tenant-a.test", call_id=call_id or ip, network_ip=ip,
                   user_agent=ua, transport=transport, expires_at=NOW + 60)


def regs(*bindings, errors=()):
    return Registrations("1001@tenant-a.test", tuple(bindings), "cache", tuple(errors))


def pol(default=Rules(), **kw):
    return Policy(default=default, **kw)


INTL = (re.compile(r"^(00|011|\+)"),)

# id, call changes, answer, policy, expected (action, reason, rule)
CASES = [
    # scopes
    ("scope-all-guards-local", {"destination": "1002", "call_direction": "local", "user_exists": "true"},
     regs(b("127.0.0.10")), pol(), (D, R.IP_NOT_REGISTERED, R.IP_NOT_REGISTERED)),
    ("offnet-lets-local-through", {"destination": "1002", "call_direction": "local", "user_exists": "true"},
     None, pol(Rules(scope=Scope.OFFNET)), (A, R.OUT_OF_SCOPE, R.OUT_OF_SCOPE)),
    ("offnet-guards-user-exists-false", {"call_direction": "local"}, regs(b("127.0.0.10")),
     pol(Rules(scope=Scope.OFFNET)), (D, R.IP_NOT_REGISTERED, R.IP_NOT_REGISTERED)),
    ("offnet-guards-direction-outbound", {"user_exists": ""}, regs(b("127.0.0.10")),
     pol(Rules(scope=Scope.OFFNET)), (D, R.IP_NOT_REGISTERED, R.IP_NOT_REGISTERED)),
    ("pattern-guards-international", {}, regs(b("127.0.0.10")),
     pol(Rules(scope=Scope.PATTERNS, scope_patterns=INTL)), (D, R.IP_NOT_REGISTERED, R.IP_NOT_REGISTERED)),
    ("pattern-lets-national-through", {"destination": "02030001234"}, None,
     pol(Rules(scope=Scope.PATTERNS, scope_patterns=INTL)), (A, R.OUT_OF_SCOPE, R.OUT_OF_SCOPE)),
    ("emergency-above-scope", {"destination": "911"}, None,
     pol(Rules(scope=Scope.PATTERNS, scope_patterns=(re.compile("."),))), (A, R.EMERGENCY, R.EMERGENCY)),
    # allowlists
    ("global-allowlist", {}, None, pol(global_allow_cidrs=(net("127.0.0.0/24"),)), (A, R.ALLOWLISTED, R.ALLOWLISTED)),
    ("domain-allowlist", {}, None, pol(domains={"tenant-a.test": Rules(allow_cidrs=(net("127.0.0.20/32"),))}),
     (A, R.ALLOWLISTED, R.ALLOWLISTED)),
    ("other-domain-allowlist-not-used", {}, regs(b("127.0.0.10")),
     pol(domains={"tenant-b.test": Rules(allow_cidrs=(net("127.0.0.20/32"),))}),
     (D, R.IP_NOT_REGISTERED, R.IP_NOT_REGISTERED)),
    ("extension-allowlist", {}, None,
     pol(extensions={"1001@tenant-a.test": ExtensionRules(allow_cidrs=(net("127.0.0.16/28"),))}),
     (A, R.ALLOWLISTED, R.ALLOWLISTED)),
    ("other-extension-allowlist-not-used", {"auth_user": "1002", "from_user": "1002"}, regs(),
     pol(extensions={"1001@tenant-a.test": ExtensionRules(allow_cidrs=(net("127.0.0.16/28"),))}),
     (D, R.NOT_REGISTERED, R.NOT_REGISTERED)),
    ("allowlist-v6", {"source_ip": "2001:db8::7"}, None, pol(global_allow_cidrs=(net("2001:db8::/32"),)),
     (A, R.ALLOWLISTED, R.ALLOWLISTED)),
    ("allowlist-skips-failed-lookup", {}, None, pol(global_allow_cidrs=(net("127.0.0.20/32"),)),
     (A, R.ALLOWLISTED, R.ALLOWLISTED)),
    # trusted proxies
    ("proxy-header-registered-client", {"source_ip": "192.0.2.5", "proxy_client_ip": "127.0.0.10"},
     regs(b("127.0.0.10")), pol(trusted_proxies=(PROXY,)), (A, R.REGISTERED_IP, R.REGISTERED_IP)),
    ("proxy-header-unregistered-client", {"source_ip": "192.0.2.5", "proxy_client_ip": "203.0.113.9"},
     regs(b("127.0.0.10")), pol(trusted_proxies=(PROXY,)), (D, R.IP_NOT_REGISTERED, R.IP_NOT_REGISTERED)),
    ("proxy-without-header-uses-proxy-ip", {"source_ip": "192.0.2.5"}, regs(b("127.0.0.10")),
     pol(trusted_proxies=(PROXY,)), (D, R.IP_NOT_REGISTERED, R.IP_NOT_REGISTERED)),
    ("spoofed-header", {"proxy_client_ip": "127.0.0.10"}, None, pol(trusted_proxies=(PROXY,)),
     (D, R.SPOOFED_HEADER, R.SPOOFED_HEADER)),
    ("spoofed-header-without-any-proxy", {"proxy_client_ip": "127.0.0.10"}, None, pol(),
     (D, R.SPOOFED_HEADER, R.SPOOFED_HEADER)),
    ("spoofed-header-emergency-still-allowed", {"proxy_client_ip": "1.2.3.4", "destination": "112"}, None, pol(),
     (A, R.EMERGENCY, R.EMERGENCY)),
    ("spoofed-header-observed", {"proxy_client_ip": "1.2.3.4"}, None, pol(Rules(mode=Mode.OBSERVE)),
     (A, R.OBSERVE, R.SPOOFED_HEADER)),
    ("proxy-client-allowlisted", {"source_ip": "192.0.2.5", "proxy_client_ip": "10.1.1.1"}, None,
     pol(trusted_proxies=(PROXY,), global_allow_cidrs=(net("10.0.0.0/8"),)), (A, R.ALLOWLISTED, R.ALLOWLISTED)),
    ("proxy-ip-itself-not-allowlisted-by-client", {"source_ip": "192.0.2.5", "proxy_client_ip": "203.0.113.9"},
     regs(), pol(trusted_proxies=(PROXY,), global_allow_cidrs=(net("192.0.2.0/24"),)),
     (D, R.NOT_REGISTERED, R.NOT_REGISTERED)),
    # identity binding
    ("identity-off-by-default", {"from_user": "1002", "source_ip": "127.0.0.10"}, regs(b("127.0.0.10")), pol(),
     (A, R.REGISTERED_IP, R.REGISTERED_IP)),
    ("identity-mismatch", {"from_user": "1002"}, None, pol(Rules(identity_binding=True)),
     (D, R.IDENTITY_MISMATCH, R.IDENTITY_MISMATCH)),
    ("identity-alias-ok", {"from_user": "101", "source_ip": "127.0.0.10"}, regs(b("127.0.0.10")),
     pol(Rules(identity_binding=True)), (A, R.REGISTERED_IP, R.REGISTERED_IP)),
    ("identity-case-insensitive", {"from_user": "Alice", "auth_user": "alice", "source_ip": "127.0.0.10"},
     regs(Binding(user="alice", realm="tenant-a.test", call_id="c", network_ip="127.0.0.10")),
     pol(Rules(identity_binding=True)), (A, R.REGISTERED_IP, R.REGISTERED_IP)),
    ("identity-per-domain", {"from_user": "1002"}, regs(b("127.0.0.10")),
     pol(domains={"tenant-b.test": Rules(identity_binding=True)}), (D, R.IP_NOT_REGISTERED, R.IP_NOT_REGISTERED)),
    ("identity-before-allowlist", {"from_user": "1002"}, None,
     pol(Rules(identity_binding=True), global_allow_cidrs=(net("127.0.0.0/8"),)),
     (D, R.IDENTITY_MISMATCH, R.IDENTITY_MISMATCH)),
    # UA binding
    ("ua-match", {"source_ip": "127.0.0.10"}, regs(b("127.0.0.10")), pol(Rules(ua_binding=True)),
     (A, R.REGISTERED_IP, R.REGISTERED_IP)),
    ("ua-mismatch", {"source_ip": "127.0.0.10", "user_agent": "friendly-scanner"}, regs(b("127.0.0.10")),
     pol(Rules(ua_binding=True)), (D, R.UA_MISMATCH, R.UA_MISMATCH)),
    ("ua-must-match-a-binding-of-that-ip", {"source_ip": "127.0.0.10", "user_agent": "Polycom"},
     regs(b("127.0.0.10"), b("127.0.0.13", ua="Polycom")), pol(Rules(ua_binding=True)),
     (D, R.UA_MISMATCH, R.UA_MISMATCH)),
    ("ua-off-by-default", {"source_ip": "127.0.0.10", "user_agent": "x"}, regs(b("127.0.0.10")), pol(),
     (A, R.REGISTERED_IP, R.REGISTERED_IP)),
    # transport
    ("tls-only-udp-registration-does-not-count", {"source_ip": "127.0.0.10"}, regs(b("127.0.0.10")),
     pol(Rules(tls_only=True)), (D, R.NOT_REGISTERED, R.NOT_REGISTERED)),
    ("tls-only-tls-registration-counts", {"source_ip": "127.0.0.10"}, regs(b("127.0.0.10", transport="TLS")),
     pol(Rules(tls_only=True)), (A, R.REGISTERED_IP, R.REGISTERED_IP)),
    ("tls-only-out-of-scope-unaffected", {"destination": "1002", "user_exists": "true", "call_direction": "local"},
     None, pol(Rules(tls_only=True, scope=Scope.OFFNET)), (A, R.OUT_OF_SCOPE, R.OUT_OF_SCOPE)),
    # IPv6 / IPv4
    ("v6-registered-v4-calls-mismatch", {"source_ip": "127.0.0.1"}, regs(b("::1")), pol(),
     (D, R.IP_NOT_REGISTERED, R.IP_NOT_REGISTERED)),
    ("cross-family-accepts", {"source_ip": "127.0.0.1"}, regs(b("::1")), pol(Rules(cross_family=True)),
     (A, R.OTHER_FAMILY, R.OTHER_FAMILY)),
    ("cross-family-v4-registered-v6-calls", {"source_ip": "2001:db8::1"}, regs(b("127.0.0.10")),
     pol(Rules(cross_family=True)), (A, R.OTHER_FAMILY, R.OTHER_FAMILY)),
    ("cross-family-not-when-same-family-exists", {"source_ip": "127.0.0.1"}, regs(b("::1"), b("127.0.0.10")),
     pol(Rules(cross_family=True)), (D, R.IP_NOT_REGISTERED, R.IP_NOT_REGISTERED)),
    ("cross-family-needs-a-registration", {"source_ip": "127.0.0.1"}, regs(), pol(Rules(cross_family=True)),
     (D, R.NOT_REGISTERED, R.NOT_REGISTERED)),
    # per-domain and per-extension modes
    ("domain-off", {}, None, pol(domains={"tenant-a.test": Rules(mode=Mode.OFF)}), (A, R.GUARD_OFF, R.GUARD_OFF)),
    ("domain-observe", {}, regs(b("127.0.0.10")), pol(domains={"tenant-a.test": Rules(mode=Mode.OBSERVE)}),
     (A, R.OBSERVE, R.IP_NOT_REGISTERED)),
    ("domain-enforce-overrides-global-observe", {}, regs(b("127.0.0.10")),
     pol(Rules(mode=Mode.OBSERVE), domains={"tenant-a.test": Rules(mode=Mode.ENFORCE)}),
     (D, R.IP_NOT_REGISTERED, R.IP_NOT_REGISTERED)),
    ("extension-off", {}, None, pol(extensions={"1001@tenant-a.test": ExtensionRules(mode=Mode.OFF)}),
     (A, R.GUARD_OFF, R.GUARD_OFF)),
    ("extension-observe-in-enforcing-domain", {}, regs(),
     pol(extensions={"1001@tenant-a.test": ExtensionRules(mode=Mode.OBSERVE)}), (A, R.OBSERVE, R.NOT_REGISTERED)),
    ("domain-key-case-insensitive", {"auth_realm": "TENANT-A.test"}, None,
     pol(domains={"tenant-a.test": Rules(mode=Mode.OFF)}), (A, R.GUARD_OFF, R.GUARD_OFF)),
    ("off-still-not-before-credentials", {"auth_user": "", "acl_authed_by": "providers"}, None,
     pol(Rules(mode=Mode.OFF)), (A, R.ACL_TRUSTED, R.ACL_TRUSTED)),
    ("lookup-failed-in-scope", {}, Unchecked.LOOKUP_FAILED, pol(Rules(scope=Scope.OFFNET)),
     (D, R.LOOKUP_FAILED, R.LOOKUP_FAILED)),
]


@pytest.mark.parametrize("name, changes, answer, policy, expected", CASES, ids=[c[0] for c in CASES])
def test_rules(name, changes, answer, policy, expected):
    call = replace(CALL, **changes)
    needed = needs_registrations(call, policy, NOW)
    assert needed == (answer is not None), "the table row must match whether a lookup is needed"
    verdict = decide(call, answer, policy, NOW)
    assert (verdict.action, verdict.reason, verdict.rule) == expected


def test_client_ip_is_reported():
    verdict = decide(replace(CALL, source_ip="192.0.2.5", proxy_client_ip="127.0.0.10"), regs(b("127.0.0.10")),
                     pol(trusted_proxies=(PROXY,)), NOW)
    assert verdict.client_ip == "127.0.0.10"


# --- invariants -----------------------------------------------------------------

IPS = ["127.0.0.10", "127.0.0.20", "::1", "192.0.2.5", "2001:db8::1"]
cidrs = st.lists(st.sampled_from([net("127.0.0.0/24"), net("127.0.0.20/32"), net("::1/128"), net("10.0.0.0/8")]),
                 max_size=2).map(tuple)
rules = st.builds(
    Rules,
    mode=st.sampled_from(list(Mode)),
    scope=st.sampled_from(list(Scope)),
    scope_patterns=st.just(INTL),
    allow_cidrs=cidrs,
    identity_binding=st.booleans(),
    ua_binding=st.booleans(),
    tls_only=st.booleans(),
    cross_family=st.booleans(),
)
policies = st.builds(
    Policy,
    on_error=st.sampled_from(list(Action)),
    trusted_proxies=st.sampled_from([(), (PROXY,)]),
    default=rules,
    domains=st.dictionaries(st.sampled_from(["tenant-a.test", "tenant-b.test"]), rules, max_size=2),
    extensions=st.dictionaries(st.just("1001@tenant-a.test"),
                               st.builds(ExtensionRules, allow_cidrs=cidrs,
                                         mode=st.sampled_from([None, *Mode])), max_size=1),
    global_allow_cidrs=cidrs,
)
calls = st.builds(
    CallFacts,
    uuid=st.just("u"),
    source_ip=st.sampled_from(IPS + ["junk"]),
    auth_user=st.sampled_from(["", "1001", "1002"]),
    auth_realm=st.sampled_from(["tenant-a.test", "tenant-b.test"]),
    acl_authed_by=st.sampled_from(["", "providers"]),
    destination=st.sampled_from(["911", "112", "1002", "00442030001234"]),
    from_user=st.sampled_from(["1001", "1002", "101"]),
    user_agent=st.sampled_from(["Yealink T46S", "scanner"]),
    call_direction=st.sampled_from(["local", "outbound", ""]),
    user_exists=st.sampled_from(["true", "false", ""]),
    proxy_client_ip=st.sampled_from(["", "127.0.0.10", "10.1.1.1"]),
    aliases=st.sampled_from([(), ("101",)]),
)
answers = st.one_of(
    st.sampled_from(list(Unchecked)),
    st.builds(lambda bs, errors: regs(*bs, errors=errors),
              st.lists(st.builds(b, st.sampled_from(IPS), ua=st.sampled_from(["Yealink T46S", "x"]),
                                 transport=st.sampled_from(["UDP", "TLS"])), max_size=3),
              st.sampled_from([(), ("fs2: down",)])),
)


def _decide(call, answer, policy):
    return decide(call, answer if needs_registrations(call, policy, NOW) else None, policy, NOW)


@given(calls, answers, policies)
def test_emergency_is_always_allowed(call, answer, policy):
    if call.destination in policy.emergency_numbers:
        assert _decide(call, answer, policy).reason is Reason.EMERGENCY


@given(calls, answers, policies)
def test_observe_never_denies(call, answer, policy):
    observing = replace(policy, default=replace(policy.default, mode=Mode.OBSERVE), domains={},
                        extensions={k: replace(v, mode=None) for k, v in policy.extensions.items()})
    assert _decide(call, answer, observing).allowed


@given(calls, answers, policies)
def test_no_credentials_never_denied_by_the_registration_rule(call, answer, policy):
    verdict = _decide(replace(call, auth_user=""), answer, policy)
    assert verdict.allowed or verdict.rule is Reason.SPOOFED_HEADER


@given(calls, answers, policies, st.sampled_from([net("127.0.0.0/8"), net("::/0"), net("0.0.0.0/0")]),
       st.sampled_from(["global", "domain", "extension"]))
def test_adding_an_allowlist_entry_never_turns_an_allow_into_a_deny(call, answer, policy, cidr, where):
    before = _decide(call, answer, policy)
    if where == "global":
        wider = replace(policy, global_allow_cidrs=policy.global_allow_cidrs + (cidr,))
    elif where == "domain":
        domain = call.auth_realm
        current = policy.rules_for(domain)
        wider = replace(policy, domains={**policy.domains, domain: replace(current, allow_cidrs=current.allow_cidrs + (cidr,))})
    else:
        current = policy.extensions.get("1001@tenant-a.test", ExtensionRules())
        wider = replace(policy, extensions={"1001@tenant-a.test": replace(current, allow_cidrs=current.allow_cidrs + (cidr,))})
    if before.allowed:
        assert _decide(call, answer, wider).allowed
