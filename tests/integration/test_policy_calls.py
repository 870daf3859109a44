"""Policy rules end to end: simulated calls through the daemon, and ``check`` naming the rule."""

from __future__ import annotations

import pytest

from fsguard.format import render_check
from fsguard.testing.caller import CallScenario, place_call

PROXY = "127.0.0.40"
HEADER = "variable_sip_h_X-AUTH-IP"


def outcome(result):
    return result.outcome, result.variables.get("fsguard_reason")


# id, guard settings, domain settings, scenario, expected (outcome, reason); reason None = refused
CASES = [
    ("proxy-with-header-registered-client", {"trusted_proxies": [PROXY]}, {},
     CallScenario(source_ip=PROXY, extra={HEADER: "127.0.0.10"}), ("continued", "registered-ip")),
    ("proxy-with-header-foreign-client", {"trusted_proxies": [PROXY]}, {},
     CallScenario(source_ip=PROXY, extra={HEADER: "203.0.113.9"}), ("rejected", None)),
    ("proxy-without-header", {"trusted_proxies": [PROXY]}, {},
     CallScenario(source_ip=PROXY), ("rejected", None)),
    ("spoofed-header-from-a-phone", {"trusted_proxies": [PROXY]}, {},
     CallScenario(source_ip="127.0.0.20", extra={HEADER: "127.0.0.10"}), ("rejected", None)),
    ("identity-binding-mismatch", {"identity_binding": True}, {},
     CallScenario(from_user="1002"), ("rejected", None)),
    ("identity-binding-same-user", {"identity_binding": True}, {},
     CallScenario(), ("continued", "registered-ip")),
    ("ua-binding-match", {"ua_binding": True}, {},
     CallScenario(user_agent='Yealink SIP-T46S 66.86.0.15 "quoted" & <x>'), ("continued", "registered-ip")),
    ("ua-binding-mismatch", {"ua_binding": True}, {},
     CallScenario(user_agent="friendly-scanner"), ("rejected", None)),
    ("scope-patterns-local-number-passes", {"scope": "patterns", "scope_patterns": ["^(00|011|\\+)"]}, {},
     CallScenario(source_ip="127.0.0.20", destination="1002"), ("continued", "out-of-scope")),
    ("scope-patterns-international-guarded", {"scope": "patterns", "scope_patterns": ["^(00|011|\\+)"]}, {},
     CallScenario(source_ip="127.0.0.20", destination="00442030001234"), ("rejected", None)),
    ("scope-offnet-outbound-route", {"scope": "offnet"}, {},
     CallScenario(base="out-pstn-number"), ("rejected", None)),  # call_direction=outbound in the capture
    ("scope-offnet-local-call", {"scope": "offnet"}, {},
     CallScenario(source_ip="127.0.0.20", destination="1002"), ("continued", "out-of-scope")),
    ("domain-observe", {}, {"tenant-a.test": {"mode": "observe"}},
     CallScenario(source_ip="127.0.0.20"), ("continued", "observe")),
    ("other-domain-still-enforced", {}, {"tenant-b.test": {"mode": "off"}},
     CallScenario(source_ip="127.0.0.20"), ("rejected", None)),
    ("allowlisted-site", {"allow_cidrs": ["127.0.0.16/28"]}, {},
     CallScenario(source_ip="127.0.0.20"), ("continued", "allowlisted")),
]


@pytest.mark.parametrize("name, guard, domain, scenario, expected", CASES, ids=[c[0] for c in CASES])
def test_policy_end_to_end(name, guard, domain, scenario, expected, switch, start_daemon):
    daemon = start_daemon(switch, domain=domain, **guard)
    assert outcome(place_call(daemon.server.address, scenario)) == expected


CHECKS = [
    # guard settings, check payload, expected first line of `fsguard check`
    ({}, {"source_ip": "127.0.0.10"}, "ALLOW (registered-ip)"),
    ({}, {"source_ip": "127.0.0.20", "destination": "911"}, "ALLOW (emergency)"),
    ({}, {"source_ip": "127.0.0.20"}, "DENY (ip-not-registered)"),
    ({"mode": "observe"}, {"source_ip": "127.0.0.20"}, "ALLOW (observe)"),
    ({"allow_cidrs": ["127.0.0.20/32"]}, {"source_ip": "127.0.0.20"}, "ALLOW (allowlisted)"),
    ({"identity_binding": True}, {"source_ip": "127.0.0.10", "from_user": "1002"}, "DENY (identity-mismatch)"),
    ({"ua_binding": True}, {"source_ip": "127.0.0.10", "user_agent": "x"}, "DENY (ua-mismatch)"),
    ({"scope": "offnet"}, {"source_ip": "127.0.0.20", "destination": "1002", "user_exists": "true"},
     "ALLOW (out-of-scope)"),
    ({"tls_only": True}, {"source_ip": "127.0.0.10"}, "DENY (not-registered)"),
    ({"cross_family": True}, {"source_ip": "127.0.0.10", "identity": "1003@tenant-a.test",
                              "profile": "internal-ipv6"}, "ALLOW (other-family)"),
]


@pytest.mark.parametrize("guard, payload, expected", CHECKS, ids=[c[2] for c in CHECKS])
def test_check_names_the_deciding_rule(guard, payload, expected, switch, start_daemon):
    daemon = start_daemon(switch, **guard)
    answer = daemon.check({"identity": "1001@tenant-a.test", **payload})
    first, detail = render_check(answer).splitlines()[:2]
    assert first.endswith(expected)
    assert f"rule: {answer['rule']}" in detail
