"""Every captured outbound call, through the daemon, against the simulator.

Asserts the verdict, the reason and the exact bytes fsguard put on the wire,
in both registration modes (live lookup per call; cache fed by the watcher).
"""

from __future__ import annotations

import pytest
from gevent.queue import Queue

from fsguard.esl.protocol import command
from fsguard.testing.caller import CallScenario, place_call

CONNECT = [command("connect"), command("linger")]


def allowed(reason, uuid):
    return CONNECT + [command(f"api uuid_setvar_multi {uuid} fsguard_reason={reason};fsguard_verdict=allow"),
                      command("exit")]


def denied(uuid):
    return CONNECT + [command(f"api uuid_kill {uuid} CALL_REJECTED"), command("exit")]


# capture -> (socket mode, reason, verdict, outcome, what the caller got)
CAPTURED = {
    "out-allow-registered-ip": ("async", "registered-ip", "allow", "continued", None),
    "out-allow-no-resume": ("async", "registered-ip", "allow", "continued", None),
    "out-allow-park-timeout": ("async", "registered-ip", "allow", "continued", None),
    "out-sync-mode": ("static", "registered-ip", "allow", "continued", None),
    "out-sync-mode-no-resume": ("static", "registered-ip", "allow", "continued", None),
    "out-deny-respond-603": ("async", "ip-not-registered", "deny", "rejected", "603 Decline"),
    "out-deny-hangup-call-rejected": ("async", "ip-not-registered", "deny", "rejected", "603 Decline"),
    "out-no-credentials-trunk": ("async", "acl-trusted", "allow", "continued", None),
    "out-emergency-911": ("async", "emergency", "allow", "continued", None),
    "out-pstn-number": ("async", "ip-not-registered", "deny", "rejected", "603 Decline"),
    "out-tenant-b-collision": ("async", "ip-not-registered", "deny", "rejected", "603 Decline"),
    "out-multireg-second-device": ("async", "registered-ip", "allow", "continued", None),
}
NEEDS_LOOKUP = {name for name, (_, reason, *_rest) in CAPTURED.items() if reason not in ("acl-trusted", "emergency")}


@pytest.mark.parametrize("registrations", ["live", "cache"])
@pytest.mark.parametrize("capture", sorted(CAPTURED))
def test_captured_call(capture, registrations, switch, start_daemon):
    mode, reason, verdict, outcome, sip_final = CAPTURED[capture]
    daemon = start_daemon(switch, registrations=registrations)
    api_before = len(switch.api_commands)

    result = place_call(daemon.server.address, CallScenario(base=capture, uuid=None, socket_mode=mode))

    assert result.commands == (allowed(reason, result.uuid) if verdict == "allow" else denied(result.uuid))
    assert (result.outcome, result.sip_final) == (outcome, sip_final)
    if outcome == "continued":
        assert result.variables["fsguard_verdict"] == "allow"
        assert result.variables["fsguard_reason"] == reason
    else:
        assert result.hangup_cause == "CALL_REJECTED" and "fsguard_verdict" not in result.variables
    lookups = switch.api_commands[api_before:]
    if capture not in NEEDS_LOOKUP:
        assert lookups == []  # trunks and emergency calls never wait on the switch
    elif registrations == "live":
        assert len(lookups) == 1 and lookups[0].startswith("sofia xmlstatus profile internal user ")
    elif outcome == "continued":
        assert lookups == []  # answered from the cache
    else:
        assert len(lookups) == 1  # a cache deny is confirmed live before it is applied


def test_deny_from_unregistered_ip_names_the_registered_ones(switch, start_daemon):
    daemon = start_daemon(switch, registrations="live")
    outcomes = Queue()
    daemon.server.on_outcome = outcomes.put
    place_call(daemon.server.address, CallScenario(base="out-deny-respond-603"))
    outcome = outcomes.get(timeout=2)
    assert outcome.decision.verdict.registered_ips == ("127.0.0.10",)
    assert outcome.decision.call.identity == "1001@tenant-a.test" and outcome.effective


def test_observe_mode_allows_and_says_why(switch, start_daemon):
    daemon = start_daemon(switch, mode="observe")
    result = place_call(daemon.server.address, CallScenario(base="out-deny-respond-603"))
    assert result.outcome == "continued" and result.variables["fsguard_reason"] == "observe"
    assert result.commands == allowed("observe", result.uuid)


def test_caller_hangs_up_while_fsguard_decides(switch, start_daemon):
    switch.api_delay = 0.3  # the lookup outlasts the caller's patience
    daemon = start_daemon(switch, registrations="live")
    outcomes = Queue()
    daemon.server.on_outcome = outcomes.put
    result = place_call(daemon.server.address, CallScenario(base="out-caller-cancels", cancel_after=0.05))
    assert (result.outcome, result.sip_final) == ("cancelled", "487 Request Terminated")
    assert result.commands[-1] == command("exit") and result.closed_by == "switch"
    outcome = outcomes.get(timeout=2)
    assert outcome.caller_hung_up and not outcome.effective and outcome.error == ""
    daemon.server.pool.join(timeout=2)
    assert len(daemon.server.pool) == 0  # no greenlet left behind


def test_ipv6_registration_allows_its_ipv6_caller(switch, start_daemon):
    daemon = start_daemon(switch, registrations="live")
    scenario = CallScenario(auth_user="1003", realm="tenant-a.test", source_ip="::1", source_port=5077,
                            extra={"variable_sofia_profile_name": "internal-ipv6"})
    result = place_call(daemon.server.address, scenario)
    assert result.variables.get("fsguard_reason") == "registered-ip"
    assert switch.api_commands[-1] == "sofia xmlstatus profile internal-ipv6 user 1003@tenant-a.test"
