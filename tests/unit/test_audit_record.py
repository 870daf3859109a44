"""AuditRecord.from_decision: what the daemon hands the writer, built without I/O."""

import dataclasses
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fsguard.audit import AuditRecord
from fsguard.audit.models import AuditDecision, clean
from fsguard.audit.spool import decode, encode
from fsguard.call import CallFacts
from fsguard.guard import Decision
from fsguard.policy import Action, Reason, Verdict

AT = datetime(2024, 5, 1, 12, 0, 5, 123456, tzinfo=timezone(timedelta(hours=2)))
CALL = CallFacts(
    uuid="6b6c9c4e-1111-4d6e-9a3c-0f5a7e0b2c10", source_ip="203.0.113.45", source_port="5062", auth_user="1001",
    auth_realm="tenant-a.test", destination="00442030001234", from_user="1001", domain="tenant-a.test",
    profile="internal", user_agent="friendly-scanner",
)


def make(call=CALL, verdict=None, lookup="cache+live", latency=0.0042, error="", mode="enforce"):
    verdict = verdict or Verdict(Action.DENY, Reason.IP_NOT_REGISTERED, Reason.IP_NOT_REGISTERED,
                                 ("192.0.2.10", "192.0.2.11"))
    return AuditRecord.from_decision(Decision(call, verdict, lookup, latency, error), mode, "fs1", AT)


def test_every_field():
    assert dataclasses.asdict(make()) == {
        "at": datetime(2024, 5, 1, 10, 0, 5, 123456, tzinfo=UTC),
        "call_uuid": "6b6c9c4e-1111-4d6e-9a3c-0f5a7e0b2c10",
        "switch": "fs1",
        "profile": "internal",
        "domain": "tenant-a.test",
        "auth_user": "1001",
        "auth_realm": "tenant-a.test",
        "from_user": "1001",
        "destination": "00442030001234",
        "client_ip": "203.0.113.45",
        "source_ip": "203.0.113.45",
        "source_port": 5062,
        "registered_ips": "192.0.2.10 192.0.2.11",
        "user_agent": "friendly-scanner",
        "verdict": "deny",
        "reason": "ip-not-registered",
        "rule": "ip-not-registered",
        "mode": "enforce",
        "lookup": "cache+live",
        "latency_us": 4200,
        "error": "",
    }


def test_observe_mode_keeps_the_rule():
    record = make(verdict=Verdict(Action.ALLOW, Reason.OBSERVE, Reason.NOT_REGISTERED), mode="observe")
    assert (record.verdict, record.reason, record.rule, record.mode) == ("allow", "observe", "not-registered",
                                                                          "observe")
    assert record.registered_ips == ""


def test_lookup_failure_keeps_the_error():
    verdict = Verdict(Action.DENY, Reason.TIMEOUT, Reason.TIMEOUT)
    record = make(verdict=verdict, lookup="none", error="no answer within decision_timeout=2s")
    assert (record.reason, record.lookup, record.error) == ("timeout", "none", "no answer within decision_timeout=2s")


def test_behind_a_trusted_proxy_the_client_is_the_caller():
    call = dataclasses.replace(CALL, source_ip="10.0.0.5", proxy_client_ip="198.51.100.7")
    verdict = Verdict(Action.DENY, Reason.IP_NOT_REGISTERED, Reason.IP_NOT_REGISTERED, (), "::ffff:198.51.100.7")
    record = make(call=call, verdict=verdict)
    assert (record.client_ip, record.source_ip) == ("198.51.100.7", "10.0.0.5")


def test_naive_time_is_refused():
    decision = Decision(CALL, Verdict(Action.ALLOW, Reason.EMERGENCY, Reason.EMERGENCY), "none", 0.0)
    with pytest.raises(ValueError, match="timezone-aware"):
        AuditRecord.from_decision(decision, "enforce", "fs1", datetime(2024, 5, 1))


@pytest.mark.parametrize("source_ip, source_port, ip, port", [
    ("::ffff:192.0.2.1", "5060", "192.0.2.1", 5060),
    ("[2001:db8::1]", "5080", "2001:db8::1", 5080),
    ("2001:DB8::0:1", "", "2001:db8::1", None),
    ("not-an-ip", "abc", "not-an-ip", None),
    ("", "70000", "", None),
])
def test_addresses_are_normalised(source_ip, source_port, ip, port):
    record = make(call=dataclasses.replace(CALL, source_ip=source_ip, source_port=source_port))
    assert (record.source_ip, record.source_port) == (ip, port)


def test_hostile_text_fits_the_columns():
    call = dataclasses.replace(CALL, user_agent="A\x00" * 500, from_user="\ud800evil", destination="9" * 1000)
    record = make(call=call)
    assert len(record.user_agent) == AuditDecision.__table__.c.user_agent.type.length
    assert "\x00" not in record.user_agent
    assert record.from_user == "?evil"
    assert len(record.destination) == 128


def test_latency_is_whole_microseconds_within_an_integer():
    assert make(latency=0.0000016).latency_us == 2
    assert make(latency=1e9).latency_us == 2**31 - 1
    assert make(latency=-1).latency_us == 0


@given(st.text(), st.integers(min_value=1, max_value=300))
def test_clean_always_gives_storable_text(text, limit):
    value = clean(text, limit)
    value.encode("utf-8")
    assert "\x00" not in value and len(value) <= limit


def test_row_has_every_column_but_the_id():
    record_id = uuid.uuid4()
    row = make().row(record_id)
    assert set(row) == set(AuditDecision.__table__.c.keys()) - {"id"}
    assert row["record_id"] == record_id


def test_spool_encoding_round_trips():
    row = make().row(uuid.uuid4())
    assert decode(encode(row)) == row


def test_importing_the_package_does_not_import_sqlalchemy():
    probe = ("import sys, fsguard.audit, fsguard.audit.cli; assert 'sqlalchemy' not in sys.modules; "
             "fsguard.audit.AuditRecord; assert 'sqlalchemy' in sys.modules; print('ok')")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "ok", result.stderr
    with pytest.raises(AttributeError):
        import fsguard.audit

        fsguard.audit.Nothing  # noqa: B018


def test_cli_exit_codes_are_the_daemons():
    from fsguard.audit import cli
    from fsguard.daemon import EXIT_CONFIG, EXIT_UNAVAILABLE

    assert (cli.EXIT_CONFIG, cli.EXIT_UNAVAILABLE) == (EXIT_CONFIG, EXIT_UNAVAILABLE)


def test_record_ids_are_version_7_and_ordered_by_time(monkeypatch):
    import time as time_module

    from fsguard.audit.writer import new_record_id

    clock = iter([1_795_370_590_000_000_000, 1_795_370_590_001_000_000, 1_795_370_590_001_000_000])
    monkeypatch.setattr(time_module, "time_ns", lambda: next(clock))
    first, second, third = new_record_id(), new_record_id(), new_record_id()
    assert {first.version, second.version, third.version} == {7} and first.variant == second.variant == "specified in RFC 4122"
    assert first.int >> 80 == 1_795_370_590_000 and second.int >> 80 == third.int >> 80 == 1_795_370_590_001
    assert first < second and second != third  # later millisecond sorts after; same millisecond: random bits differ
