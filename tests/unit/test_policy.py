"""The verdict, table-driven: one row per rule and interaction."""

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fsguard.call import CallFacts, facts_from_channel_data
from fsguard.policy import Action, Mode, Policy, Reason, Rules, Unchecked, decide, needs_registrations
from fsguard.registrations import Binding, Registrations, parse_xmlstatus
from tests.helpers import capture_messages

NOW = 1_800_000_000.0
ENFORCE = Policy()
OBSERVE = Policy(default=Rules(mode=Mode.OBSERVE))
FAIL_OPEN = Policy(on_error=Action.ALLOW)

CALL = CallFacts(uuid="u1", source_ip="127.0.0.10", auth_user="1001", auth_realm="tenant-a.test",
                 destination="9196", profile="internal")


def binding(ip, user="1001", realm="tenant-a.test", expires_at=NOW + 60, call_id="c1"):
    return Binding(user=user, realm=realm, call_id=call_id, network_ip=ip, expires_at=expires_at)


def regs(*bindings, errors=()):
    return Registrations("1001@tenant-a.test", tuple(bindings), "live", tuple(errors))


A, D = Action.ALLOW, Action.DENY
R = Reason

# id, call changes, registrations, policy, action, reason, rule
CASES = [
    ("registered-ip", {}, regs(binding("127.0.0.10")), ENFORCE, A, R.REGISTERED_IP, R.REGISTERED_IP),
    ("wrong-ip", {"source_ip": "127.0.0.20"}, regs(binding("127.0.0.10")), ENFORCE, D, R.IP_NOT_REGISTERED, R.IP_NOT_REGISTERED),
    ("not-registered", {}, regs(), ENFORCE, D, R.NOT_REGISTERED, R.NOT_REGISTERED),
    ("second-device", {"source_ip": "127.0.0.13"}, regs(binding("127.0.0.12"), binding("127.0.0.13", call_id="c2")), ENFORCE, A, R.REGISTERED_IP, R.REGISTERED_IP),
    ("other-tenant-same-ext", {"auth_realm": "tenant-b.test"}, regs(binding("127.0.0.10")), ENFORCE, D, R.NOT_REGISTERED, R.NOT_REGISTERED),
    ("other-ext-same-ip", {"auth_user": "1002"}, regs(binding("127.0.0.10")), ENFORCE, D, R.NOT_REGISTERED, R.NOT_REGISTERED),
    ("realm-case-insensitive", {"auth_realm": "Tenant-A.TEST"}, regs(binding("127.0.0.10")), ENFORCE, A, R.REGISTERED_IP, R.REGISTERED_IP),
    ("expired-binding", {}, regs(binding("127.0.0.10", expires_at=NOW - 1)), ENFORCE, D, R.NOT_REGISTERED, R.NOT_REGISTERED),
    ("expires-exactly-now", {}, regs(binding("127.0.0.10", expires_at=NOW)), ENFORCE, D, R.NOT_REGISTERED, R.NOT_REGISTERED),
    ("unknown-expiry-counts", {}, regs(binding("127.0.0.10", expires_at=None)), ENFORCE, A, R.REGISTERED_IP, R.REGISTERED_IP),
    ("expired-and-live", {"source_ip": "127.0.0.12"}, regs(binding("127.0.0.12", expires_at=NOW - 5), binding("127.0.0.13", call_id="c2")), ENFORCE, D, R.IP_NOT_REGISTERED, R.IP_NOT_REGISTERED),
    ("ipv6-forms", {"source_ip": "0:0:0:0:0:0:0:1"}, regs(binding("::1")), ENFORCE, A, R.REGISTERED_IP, R.REGISTERED_IP),
    ("ipv4-mapped", {"source_ip": "::ffff:127.0.0.10"}, regs(binding("127.0.0.10")), ENFORCE, A, R.REGISTERED_IP, R.REGISTERED_IP),
    ("v6-registered-v4-calls", {"source_ip": "127.0.0.1"}, regs(binding("::1")), ENFORCE, D, R.IP_NOT_REGISTERED, R.IP_NOT_REGISTERED),
    ("unparseable-source", {"source_ip": "not-an-ip"}, regs(binding("127.0.0.10")), ENFORCE, D, R.IP_NOT_REGISTERED, R.IP_NOT_REGISTERED),
    ("no-credentials", {"auth_user": "", "auth_realm": ""}, None, ENFORCE, A, R.NO_CREDENTIALS, R.NO_CREDENTIALS),
    ("acl-trusted", {"auth_user": "", "auth_realm": "", "acl_authed_by": "providers"}, None, ENFORCE, A, R.ACL_TRUSTED, R.ACL_TRUSTED),
    ("emergency-wrong-ip", {"destination": "911", "source_ip": "127.0.0.20"}, regs(binding("127.0.0.10")), ENFORCE, A, R.EMERGENCY, R.EMERGENCY),
    ("emergency-lookup-failed", {"destination": "112"}, Unchecked.LOOKUP_FAILED, ENFORCE, A, R.EMERGENCY, R.EMERGENCY),
    ("emergency-unchecked", {"destination": "999"}, None, ENFORCE, A, R.EMERGENCY, R.EMERGENCY),
    ("emergency-prefix-is-not-emergency", {"destination": "9111"}, regs(), ENFORCE, D, R.NOT_REGISTERED, R.NOT_REGISTERED),
    ("lookup-failed-deny", {}, Unchecked.LOOKUP_FAILED, ENFORCE, D, R.LOOKUP_FAILED, R.LOOKUP_FAILED),
    ("lookup-failed-allow", {}, Unchecked.LOOKUP_FAILED, FAIL_OPEN, A, R.LOOKUP_FAILED, R.LOOKUP_FAILED),
    ("timeout-deny", {}, Unchecked.TIMEOUT, ENFORCE, D, R.TIMEOUT, R.TIMEOUT),
    ("timeout-allow", {}, Unchecked.TIMEOUT, FAIL_OPEN, A, R.TIMEOUT, R.TIMEOUT),
    ("partial-answer-match-allows", {}, regs(binding("127.0.0.10"), errors=["fs2: down"]), ENFORCE, A, R.REGISTERED_IP, R.REGISTERED_IP),
    ("partial-answer-no-match-on-error", {"source_ip": "127.0.0.20"}, regs(binding("127.0.0.10"), errors=["fs2: down"]), ENFORCE, D, R.LOOKUP_FAILED, R.LOOKUP_FAILED),
    ("partial-answer-fail-open", {"source_ip": "127.0.0.20"}, regs(errors=["fs2: down"]), FAIL_OPEN, A, R.LOOKUP_FAILED, R.LOOKUP_FAILED),
    ("observe-wrong-ip", {"source_ip": "127.0.0.20"}, regs(binding("127.0.0.10")), OBSERVE, A, R.OBSERVE, R.IP_NOT_REGISTERED),
    ("observe-lookup-failed", {}, Unchecked.LOOKUP_FAILED, OBSERVE, A, R.OBSERVE, R.LOOKUP_FAILED),
    ("observe-allow-unchanged", {}, regs(binding("127.0.0.10")), OBSERVE, A, R.REGISTERED_IP, R.REGISTERED_IP),
    ("custom-emergency-list", {"destination": "18"}, Unchecked.LOOKUP_FAILED, Policy(emergency_numbers=frozenset({"18"})), A, R.EMERGENCY, R.EMERGENCY),
]


@pytest.mark.parametrize("name, changes, registrations, policy, action, reason, rule", CASES, ids=[c[0] for c in CASES])
def test_verdict_table(name, changes, registrations, policy, action, reason, rule):
    verdict = decide(replace(CALL, **changes), registrations, policy, NOW)
    assert (verdict.action, verdict.reason, verdict.rule) == (action, reason, rule)


def test_registered_ips_are_reported():
    verdict = decide(replace(CALL, source_ip="127.0.0.20"), regs(binding("127.0.0.13"), binding("127.0.0.12", call_id="c2")), ENFORCE, NOW)
    assert verdict.registered_ips == ("127.0.0.12", "127.0.0.13")


def test_credentialed_call_without_registrations_is_a_bug_not_an_allow():
    with pytest.raises(ValueError):
        decide(CALL, None, ENFORCE, NOW)


def test_lookup_is_skipped_for_emergency_and_uncredentialed_calls():
    assert needs_registrations(CALL, ENFORCE)
    assert not needs_registrations(replace(CALL, destination="911"), ENFORCE)
    assert not needs_registrations(replace(CALL, auth_user=""), ENFORCE)


# --- recorded inputs: every captured call against the captured registrations

def _captured_registrations():
    replies = [m for m in capture_messages("in-api-registrations", "fs>app") if m.content_type == "api/response"]
    bindings = parse_xmlstatus(replies[0].body, now=NOW)
    return lambda call: Registrations(call.identity, tuple(bindings), "live")


CAPTURED = {
    # capture: (action, reason) with the registrations of in-api-registrations
    "out-allow-registered-ip": (A, R.REGISTERED_IP),
    "out-allow-no-resume": (A, R.REGISTERED_IP),
    "out-allow-park-timeout": (A, R.REGISTERED_IP),
    "out-sync-mode": (A, R.REGISTERED_IP),
    "out-sync-mode-no-resume": (A, R.REGISTERED_IP),
    "out-caller-cancels": (A, R.REGISTERED_IP),
    "out-deny-respond-603": (D, R.IP_NOT_REGISTERED),
    "out-deny-hangup-call-rejected": (D, R.IP_NOT_REGISTERED),
    "out-no-credentials-trunk": (A, R.ACL_TRUSTED),
    "out-emergency-911": (A, R.EMERGENCY),
    "out-pstn-number": (D, R.IP_NOT_REGISTERED),
    "out-tenant-b-collision": (D, R.IP_NOT_REGISTERED),
    "out-multireg-second-device": (A, R.REGISTERED_IP),
}


@pytest.mark.parametrize("name", sorted(CAPTURED))
def test_captured_calls(name):
    call = facts_from_channel_data(capture_messages(name, "fs>app")[0].headers)
    lookup = _captured_registrations()
    answer = lookup(call) if needs_registrations(call, ENFORCE) else None
    verdict = decide(call, answer, ENFORCE, NOW)
    assert (verdict.action, verdict.reason) == CAPTURED[name]


# --- invariants

calls = st.builds(
    CallFacts,
    uuid=st.just("u"),
    source_ip=st.sampled_from(["127.0.0.10", "127.0.0.20", "::1", "::ffff:127.0.0.10", "junk", ""]),
    auth_user=st.sampled_from(["", "1001", "1002"]),
    auth_realm=st.sampled_from(["tenant-a.test", "tenant-b.test"]),
    acl_authed_by=st.sampled_from(["", "providers"]),
    destination=st.sampled_from(["911", "112", "9196", "00442030001234", ""]),
)
answers = st.one_of(
    st.sampled_from(list(Unchecked)),
    st.builds(
        lambda bs, errs: Registrations("x", tuple(bs), "live", tuple(errs)),
        st.lists(st.builds(binding, st.sampled_from(["127.0.0.10", "::1", "127.0.0.13"]),
                           user=st.sampled_from(["1001", "1002"]),
                           realm=st.sampled_from(["tenant-a.test", "tenant-b.test"]),
                           expires_at=st.sampled_from([None, NOW - 1, NOW + 1])), max_size=4),
        st.lists(st.just("fs2: down"), max_size=1),
    ),
)
policies = st.builds(Policy, default=st.builds(Rules, mode=st.sampled_from(list(Mode))), on_error=st.sampled_from(list(Action)))


@given(calls, answers, policies)
def test_invariants(call, answer, policy):
    verdict = decide(call, answer if needs_registrations(call, policy) else None, policy, NOW)
    if call.destination in policy.emergency_numbers:
        assert verdict.allowed and verdict.reason is Reason.EMERGENCY
    if policy.mode is Mode.OBSERVE:
        assert verdict.allowed
    if not call.has_credentials:
        assert verdict.allowed
    if verdict.reason is Reason.REGISTERED_IP:
        assert call.source_address is not None
