"""benchmarks/freeswitch_bench.py without FreeSWITCH: sipp's files -> figures -> verdicts, and the twin."""

import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from benchmarks import freeswitch_bench as fb

ROOT = Path(__file__).resolve().parents[2]
TEST_EXTENSIONS = ROOT / "docker" / "freeswitch" / "dialplan" / "tenant-a.test" / "50_test_extensions.xml"
SHIPPED_INCLUDE = ROOT / "freeswitch-conf" / "dialplan" / "00_fsguard.xml"


def message(stamp: str, direction: str, first_line: str, call_id: str, cseq: str, *extra: str) -> str:
    """One block of a sipp -trace_msg file, as SIPp 3.6.1 writes it."""
    head = "UDP message sent (300 bytes):" if direction == "sent" else "UDP message received [300] bytes :"
    headers = [first_line, "Via: SIP/2.0/UDP 127.0.0.10:5170;branch=z9hG4bK-1", f"Call-ID: {call_id}",
               f"CSeq: {cseq}", *extra, "Content-Length: 0"]
    separator = "-" * 47
    return f"{separator} 2026-11-22 {stamp}\n{head}\n\n" + "\n".join(headers) + "\n\n"


DIGEST = 'Proxy-Authorization: Digest username="1001",realm="tenant-a.test",uri="sip:9196@tenant-a.test"'
TRACE = "".join([
    # answered; the digest INVITE was retransmitted once: set-up counts from its first send
    message("10:00:00.000000", "sent", "INVITE sip:9196@tenant-a.test SIP/2.0", "a", "1 INVITE"),
    message("10:00:00.001000", "received", "SIP/2.0 407 Proxy Authentication Required", "a", "1 INVITE"),
    message("10:00:00.001200", "sent", "ACK sip:9196@tenant-a.test SIP/2.0", "a", "1 ACK"),
    message("10:00:00.002000", "sent", "INVITE sip:9196@tenant-a.test SIP/2.0", "a", "2 INVITE", DIGEST),
    message("10:00:00.010000", "received", "SIP/2.0 100 Trying", "a", "2 INVITE"),
    message("10:00:00.502000", "sent", "INVITE sip:9196@tenant-a.test SIP/2.0", "a", "2 INVITE", DIGEST),
    message("10:00:00.527500", "received", "SIP/2.0 200 OK", "a", "2 INVITE"),
    message("10:00:00.528000", "received", "SIP/2.0 200 OK", "a", "2 INVITE"),  # retransmission
    message("10:00:00.600000", "sent", "BYE sip:9196@127.0.0.1:5060 SIP/2.0", "a", "3 BYE"),
    message("10:00:00.601000", "received", "SIP/2.0 200 OK", "a", "3 BYE"),
    # refused after the digest INVITE
    message("10:00:00.100000", "sent", "INVITE sip:9196@tenant-a.test SIP/2.0", "b", "1 INVITE"),
    message("10:00:00.101000", "received", "SIP/2.0 407 Proxy Authentication Required", "b", "1 INVITE"),
    message("10:00:00.102000", "sent", "INVITE sip:9196@tenant-a.test SIP/2.0", "b", "2 INVITE", DIGEST),
    message("10:00:00.120000", "received", "SIP/2.0 603 Decline", "b", "2 INVITE"),
    # refused before any challenge (an overloaded switch)
    message("10:00:00.200000", "sent", "INVITE sip:9196@tenant-a.test SIP/2.0", "c", "1 INVITE"),
    message("10:00:00.200500", "received", "SIP/2.0 503 Service Unavailable", "c", "1 INVITE"),
    # never answered
    message("10:00:00.300000", "sent", "INVITE sip:9196@tenant-a.test SIP/2.0", "d", "1 INVITE"),
    message("10:00:00.301000", "received", "SIP/2.0 407 Proxy Authentication Required", "d", "1 INVITE"),
    message("10:00:00.302000", "sent", "INVITE sip:9196@tenant-a.test SIP/2.0", "d", "2 INVITE", DIGEST),
]).replace("\n", "\r\n")  # sipp writes the messages' own CRLFs

STATS = ("StartTime;TotalCallCreated;SuccessfulCall(C);FailedCall(C);FailedRegexpDoesntMatch(C);"
         "FailedTimeoutOnRecv(C);FailedUnexpectedMessage(C);Retransmissions(C);\n"
         "2026-11-22\t10:00:00.000000\t1;1;0;0;0;0;0;0;\n"
         "2026-11-22\t10:00:00.000000\t1;4;1;3;2;1;0;1;\n")
RTT = "Date_ms;response_time_ms;rtd_no\n132.001;24;setup\n228.001;28;other\n"


def test_trace_gives_each_calls_setup_time_and_final_answer():
    calls = fb.call_timings(fb.parse_timed_trace(TRACE))
    assert sorted(calls) == ["a", "b", "c", "d"]
    assert calls["a"].setup_ms == pytest.approx(525.5)  # first digest INVITE send -> first 200 OK
    assert calls["a"].final == "200 OK"
    assert (calls["b"].setup_ms, calls["b"].final) == (None, "603 Decline")
    assert (calls["c"].digest_invite_at, calls["c"].final) == (None, "503 Service Unavailable")
    assert (calls["d"].setup_ms, calls["d"].final) == (None, None)
    assert fb.failure_reasons(calls.values()) == {"603 Decline": 1, "503 Service Unavailable": 1, "no final answer": 1}
    assert fb.achieved_rate(calls.values()) == 10.0  # 4 calls started over 0.3 s


def test_a_200_to_the_challenged_invite_is_not_a_setup_time():
    # A switch that answers without challenging: no digest INVITE, so nothing to measure.
    trace = (message("10:00:00.000000", "sent", "INVITE sip:933@tenant-a.test SIP/2.0", "x", "1 INVITE")
             + message("10:00:00.020000", "received", "SIP/2.0 200 OK", "x", "1 INVITE"))
    [call] = fb.call_timings(fb.parse_timed_trace(trace)).values()
    assert (call.setup_ms, call.final) == (None, "200 OK")


def test_run_summary_takes_counts_from_sipp_and_times_from_the_trace():
    calls = fb.call_timings(fb.parse_timed_trace(TRACE))
    rtd = fb.parse_rtt_csv(RTT)
    assert rtd == [24.0]
    summary = fb.summarize_run(calls, fb.parse_stat_csv(STATS), rtd)
    assert (summary["attempted"], summary["completed"], summary["failed"]) == (4, 1, 3)
    assert summary["sipp_failure_counters"] == {"FailedRegexpDoesntMatch": 2, "FailedTimeoutOnRecv": 1}
    assert summary["retransmissions"] == 1
    assert summary["setup_ms"]["count"] == 1 and summary["setup_ms"]["p50"] == 525.5
    assert summary["rtd_agrees"] is False  # 24 ms vs 525.5 ms


def test_stat_csv_is_read_from_its_last_row():
    assert fb.parse_stat_csv(STATS)["TotalCallCreated"] == "4"
    assert fb.parse_stat_csv("") == {}
    assert fb.stat_int({"x": "12.0", "y": ""}, "x") == 12 and fb.stat_int({}, "x") == 0


def test_percentiles_are_nearest_rank():
    values = [float(v) for v in range(100, 0, -1)]
    d = fb.distribution(values)
    assert (d["count"], d["p50"], d["p90"], d["p99"], d["max"], d["mean"]) == (100, 50.0, 90.0, 99.0, 100.0, 50.5)
    assert fb.percentile([7.0], 99) == 7.0
    assert math.isnan(fb.distribution([])["p50"])


def run(p50: float, p99: float, *, attempted: int = 500, completed: int | None = None, failed: int = 0,
        achieved: float = 25.0) -> dict:
    return {"attempted": attempted, "completed": attempted - failed if completed is None else completed,
            "failed": failed, "achieved_per_s": achieved, "setup_ms": {"p50": p50, "p90": p50, "p99": p99, "max": p99}}


def step(guarded: dict, unguarded: dict, rate: int = 25) -> dict:
    return {"offered_per_s": rate, "guarded": guarded, "unguarded": unguarded}


@pytest.mark.parametrize(("guarded", "unguarded", "verdict"), [
    (run(26.9, 40.0), run(25.0, 30.0), "PASS"),  # +1.9 ms
    (run(27.0, 30.0), run(25.0, 30.0), "PASS"),  # exactly the budget
    (run(27.1, 30.0), run(25.0, 30.0), "FAIL"),
    (run(24.0, 30.0, failed=3), run(25.0, 30.0, failed=1), "FAIL"),  # faster by losing calls
    (run(float("nan"), float("nan"), completed=0, failed=500), run(25.0, 30.0), "FAIL"),
])
def test_median_verdict(guarded, unguarded, verdict):
    result = fb.median_verdict(step(guarded, unguarded))
    assert result["verdict"] == verdict, result["why"]
    added = guarded["setup_ms"]["p50"] - unguarded["setup_ms"]["p50"]
    assert fb.delta(guarded, unguarded)["p50"] == pytest.approx(added, nan_ok=True)


def test_median_verdict_without_the_target_rate():
    assert fb.median_verdict(None)["verdict"] == "NOT MEASURED"


@pytest.mark.parametrize(("guarded", "verdict"), [
    (run(30, 110.0, attempted=4000, completed=3600), "PASS"),  # lost 40 = 1% of 4000, p99 +10%
    (run(30, 110.0, attempted=4000, completed=3599), "FAIL"),
    (run(30, 110.1, attempted=4000, completed=3640), "FAIL"),
])
def test_saturation_verdict_tolerances(guarded, verdict):
    unguarded = run(30, 100.0, attempted=4000, completed=3640, failed=360, achieved=180.0)
    result = fb.saturation_verdict(step(guarded, unguarded, rate=200), 0.01, 0.10, baseline_p99=35.0)
    assert result["verdict"] == verdict, result["why"]
    assert result["saturated"] and "360 calls failed" in result["saturation_signs"][0]


def test_saturation_floors_and_an_unsaturated_switch():
    unguarded = run(25, 10.0, attempted=100, achieved=199.0)
    ok = fb.saturation_verdict(step(run(25, 12.0, attempted=100, completed=98), unguarded, rate=200), 0.01, 0.10, 9.0)
    assert ok["verdict"] == "PASS", ok["why"]  # floors: 2 calls, 2 ms
    assert ok["saturated"] is False and "NOT saturated" in ok["why"]
    assert fb.saturated(run(25, 20.0), 25, baseline_p99=10.0) == ["p99 20.0 ms >= 2x 10.0 ms at the lowest rate"]
    assert fb.saturated(run(25, 10.0, achieved=float("nan")), 25, None) == ["achieved nan of 25 calls/s"]
    assert fb.saturation_verdict(None, 0.01, 0.1)["verdict"] == "NOT MEASURED"


def test_decision_summary():
    decisions = [{"latency_ms": "1.50", "effective": "yes", "verdict": "allow", "reason": "registered-ip"},
                 {"latency_ms": "2.50", "effective": "no", "verdict": "allow", "reason": "registered-ip",
                  "error": "'boom'"}]
    summary = fb.decision_summary(decisions, failed_lines=1)
    assert (summary["decisions"], summary["effective_yes"], summary["errors"]) == (2, 1, 2)
    assert summary["verdicts"] == {"allow/registered-ip": 2}
    assert (summary["latency_ms"]["p50"], summary["latency_ms"]["p99"]) == (1.5, 2.5)


def test_json_has_no_nan():
    assert fb.without_nan({"a": [float("nan"), 1.0], "b": {"c": float("nan")}}) == {"a": [None, 1.0], "b": {"c": None}}


def test_sipp_command_is_an_open_loop_at_the_offered_rate():
    destination = fb.Destination("unguarded", fb.UNGUARDED, "127.0.0.1:5060")
    command = fb.sipp_command("sipp", Path("uac.xml"), destination, rate=25, calls=500, hold_ms=500,
                              call_id_prefix="p", run_timeout_s=80)
    joined = " ".join(command)
    for expected in ("127.0.0.1:5060", "-s 933", "-r 25 -rp 1000 -m 500", "-i 127.0.0.10 -p 5170", "-mp 6170",
                     "-au 1001", "-auth_uri 933@tenant-a.test", "-trace_msg -message_file calls.msg",
                     "-trace_stat -stf stats.csv", "-timeout 80s"):
        assert expected in joined, expected
    assert int(command[command.index("-l") + 1]) >= 25 * (fb.RECV_TIMEOUT_S + 1)  # never holds calls back


def test_uac_scenario_measures_the_digest_invite():
    root = ET.fromstring(fb.UAC_SCENARIO.split("\n", 2)[2])  # past the XML declaration and DOCTYPE
    elements = list(root)
    [start] = [i for i, e in enumerate(elements) if e.get("start_rtd") == "setup"]
    [stop] = [i for i, e in enumerate(elements) if e.get("rtd") == "setup"]
    assert "[authentication]" in elements[start].text and "CSeq: 2 INVITE" in elements[start].text
    assert elements[stop].get("response") == "200" and elements[stop].get("optional") is None
    challenge = next(e for e in elements if e.get("response") == "407" and e.get("auth") == "true")
    assert elements.index(challenge) < start
    # every error answer to either INVITE goes to the ACK of the "rejected" branch
    errors = [e for e in elements if e.tag == "recv" and e.get("next") == "rejected"]
    assert {"503", "603"} <= {e.get("response") for e in errors[:len(errors) // 2]}
    assert "407" in {e.get("response") for e in errors[len(errors) // 2:]}
    assert any(e.tag == "label" and e.get("id") == "rejected" for e in elements)


def test_the_unguarded_twin_is_the_guarded_echo_without_the_guard():
    extensions = list(ET.parse(TEST_EXTENSIONS).getroot().iter("extension"))
    names = [e.get("name") for e in extensions]
    twin, echo = extensions[names.index(fb.TWIN_EXTENSION)], extensions[names.index("test-echo-9196")]
    assert names.index(fb.TWIN_EXTENSION) < names.index("test-emergency")  # first match ends the hunt

    def actions(extension):
        return [(a.get("application"), a.get("data")) for a in extension.iter("action")]

    assert actions(twin) == actions(echo)
    [twin_number] = [re.fullmatch(r"\^(\d+)\$", c.get("expression")).group(1) for c in twin.iter("condition")]
    assert (twin_number, fb.GUARDED) == (fb.UNGUARDED, "9196")
    guard = next(c for c in ET.parse(SHIPPED_INCLUDE).getroot().iter("condition")
                 if c.get("field") == "destination_number" and "(?!" in c.get("expression", ""))
    assert not re.search(guard.get("expression"), fb.UNGUARDED)  # the include lets it past the socket
    assert re.search(guard.get("expression"), fb.GUARDED)
