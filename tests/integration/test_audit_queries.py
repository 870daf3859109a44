"""``fsguard audit list / summary / purge``: every filter, every format, on SQLite and PostgreSQL."""

import csv
import io
import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from fsguard.audit.models import AuditDecision
from fsguard.audit.queries import LIST_COLUMNS
from fsguard.audit.store import connect
from fsguard.cli import main
from fsguard.policy import Action, Reason

pytest.register_assert_rewrite("tests.audit_conftest")  # shared fixtures and helpers, before importing it
pytest_plugins = ["tests.audit_conftest"]
from tests.audit_conftest import record  # noqa: E402

NOW = datetime.now(UTC).replace(microsecond=0)
A, D = Action.ALLOW, Action.DENY
# n: (age, decision fields); call uuid is call-00000n
DATASET = {
    0: (timedelta(days=40), dict(action=D, reason=Reason.IP_NOT_REGISTERED)),
    1: (timedelta(days=10), dict(action=A, reason=Reason.REGISTERED_IP, source_ip="192.0.2.10", destination="200")),
    2: (timedelta(days=3), dict(action=D, reason=Reason.NOT_REGISTERED, auth_user="1002",
                                auth_realm="tenant-b.test", domain="tenant-b.test", destination="0049301234",
                                registered=())),
    3: (timedelta(hours=20), dict(action=A, reason=Reason.EMERGENCY, auth_user="", auth_realm="",
                                  source_ip="192.0.2.11", destination="911")),
    4: (timedelta(hours=5), dict(action=A, reason=Reason.OBSERVE, rule=Reason.IP_NOT_REGISTERED,
                                 auth_realm="tenant-b.test", domain="tenant-b.test", source_ip="198.51.100.7")),
    5: (timedelta(hours=2), dict(action=D, reason=Reason.IP_NOT_REGISTERED, source_ip="10.0.0.5",  # a proxy
                                 client_ip="198.51.100.7")),
    6: (timedelta(minutes=30), dict(action=A, reason=Reason.ACL_TRUSTED, auth_user="", auth_realm="",
                                    source_ip="::ffff:192.0.2.99", destination="0033140000000", domain="")),
    7: (timedelta(minutes=5), dict(action=D, reason=Reason.TIMEOUT, lookup="none", registered=())),
}


@pytest.fixture
def seeded(db_url):
    rows = []
    for n, (age, fields) in DATASET.items():
        mode = "observe" if fields.get("reason") is Reason.OBSERVE else "enforce"
        rows.append(record(n, at=NOW - age, mode=mode, **fields).row(uuid.uuid4()))
    with connect(db_url) as connection:
        connection.execute(sa.insert(AuditDecision), rows)
        connection.commit()
    return db_url


def audit(url, *args):
    result = CliRunner().invoke(main, ["audit", *args, "--url", url], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    return result.output


def listed(url, *args):
    lines = audit(url, "list", "--format", "json", *args).splitlines()
    return [int(json.loads(line)["call_uuid"][5:]) for line in lines]


def test_list_is_newest_first(seeded):
    assert listed(seeded) == [7, 6, 5, 4, 3, 2, 1, 0]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--since", "24h"], [7, 6, 5, 4, 3]),
        (["--since", "7d"], [7, 6, 5, 4, 3, 2]),
        (["--until", "1h"], [5, 4, 3, 2, 1, 0]),
        (["--since", "7d", "--until", "3h"], [4, 3, 2]),
        (["--since", (NOW - timedelta(days=11)).date().isoformat(), "--until", (NOW - timedelta(days=9)).isoformat()],
         [1]),
        (["--since", (NOW - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S+00:00")], [7, 6]),
        (["--verdict", "deny"], [7, 5, 2, 0]),
        (["--verdict", "allow"], [6, 4, 3, 1]),
        (["--reason", "ip-not-registered"], [5, 0]),
        (["--reason", "observe"], [4]),
        (["--domain", "tenant-b.test"], [4, 2]),
        (["--user", "1001"], [7, 5, 4, 1, 0]),
        (["--user", "1001@tenant-a.test"], [7, 5, 1, 0]),
        (["--user", "1002@tenant-b.test"], [2]),
        (["--ip", "203.0.113.45"], [7, 2, 0]),
        (["--ip", "198.51.100.7"], [5, 4]),  # the client behind the proxy
        (["--ip", "10.0.0.5"], [5]),  # the proxy
        (["--ip", "192.0.2.99"], [6]),
        (["--ip", "::ffff:192.0.2.99"], [6]),
        (["--destination", "911"], [3]),
        (["--call", "call-000004"], [4]),
        (["--limit", "3"], [7, 6, 5]),
        (["--verdict", "deny", "--user", "1001@tenant-a.test", "--since", "7d"], [7, 5]),
        (["--ip", "10.9.9.9"], []),
    ],
)
def test_list_filters(seeded, args, expected):
    assert listed(seeded, *args) == expected


def test_list_json_has_every_column(seeded):
    first = json.loads(audit(seeded, "list", "--format", "json", "--limit", "1", "--call", "call-000004"))
    assert list(first) == list(LIST_COLUMNS)
    assert first["at"] == (NOW - timedelta(hours=5)).isoformat()
    assert first | {"at": None} == {
        "at": None, "verdict": "allow", "reason": "observe", "rule": "ip-not-registered", "mode": "observe",
        "auth_user": "1001", "auth_realm": "tenant-b.test", "domain": "tenant-b.test", "from_user": "1001",
        "destination": "00442030001234", "client_ip": "198.51.100.7", "source_ip": "198.51.100.7",
        "source_port": 5060,
        "registered_ips": "192.0.2.10", "user_agent": "Yealink SIP-T46S", "call_uuid": "call-000004", "switch": "fs1",
        "profile": "internal", "lookup": "cache", "latency_us": 1200, "error": "",
    }


def test_list_csv(seeded):
    rows = list(csv.DictReader(io.StringIO(audit(seeded, "list", "--format", "csv"))))
    assert len(rows) == 8 and list(rows[0]) == list(LIST_COLUMNS)
    assert rows[0]["call_uuid"] == "call-000007" and rows[0]["verdict"] == "deny"
    assert datetime.fromisoformat(rows[0]["at"]) == NOW - timedelta(minutes=5)


def test_list_table_fits_80_columns(seeded):
    text = audit(seeded, "list")
    lines = text.splitlines()
    assert lines[0].split() == ["UTC", "TIME", "VERDICT", "REASON", "USER", "CLIENT", "IP", "DEST"]
    assert len(lines) == 1 + 8 + 1  # header, rows, the observe-mode legend
    assert max(len(line) for line in lines) <= 80
    observed = next(line for line in lines if "(deny)" in line)
    assert "ip-not-registered" in observed and "198.51.100.7" in observed
    assert lines[3].split()[2:4] == ["deny", "ip-not-registered"]  # call 5
    assert lines[3].split()[4].startswith("1001@tenant")


def test_empty_result_in_every_format(seeded):
    assert audit(seeded, "list", "--ip", "10.9.9.9") == "no decisions match\n"
    assert audit(seeded, "list", "--ip", "10.9.9.9", "--format", "json") == ""
    assert audit(seeded, "list", "--ip", "10.9.9.9", "--format", "csv") == ",".join(LIST_COLUMNS) + "\n"
    assert audit(seeded, "summary", "--ip", "10.9.9.9") == "no decisions match\n"


def summary(url, *args):
    lines = audit(url, "summary", "--format", "json", *args).splitlines()
    sections = {}
    for line in lines:
        row = json.loads(line)
        sections.setdefault(row.pop("section"), []).append(row)
    return sections


def test_summary(seeded):
    s = summary(seeded)
    assert s["verdict"] == [  # by count, then verdict and reason
        {"verdict": "deny", "reason": "ip-not-registered", "count": 2},
        {"verdict": "allow", "reason": "acl-trusted", "count": 1},
        {"verdict": "allow", "reason": "emergency", "count": 1},
        {"verdict": "allow", "reason": "observe", "count": 1},
        {"verdict": "allow", "reason": "registered-ip", "count": 1},
        {"verdict": "deny", "reason": "not-registered", "count": 1},
        {"verdict": "deny", "reason": "timeout", "count": 1},
    ]
    assert sum(r["count"] for r in s["verdict"]) == 8
    # refused: denied, or let through by observe mode
    assert s["refused_ip"] == [{"ip": "203.0.113.45", "count": 3}, {"ip": "198.51.100.7", "count": 2}]
    assert s["refused_extension"] == [
        {"extension": "1001@tenant-a.test", "count": 3, "ips": 2},
        {"extension": "1001@tenant-b.test", "count": 1, "ips": 1},
        {"extension": "1002@tenant-b.test", "count": 1, "ips": 1},
    ]
    days = {}
    for row in s["day"]:
        days.setdefault(row["day"], {})[row["verdict"]] = row["count"]
    expected = {}
    for age, fields in DATASET.values():
        day = (NOW - age).date().isoformat()
        verdict = str(fields["action"])
        expected.setdefault(day, {}).setdefault(verdict, 0)
        expected[day][verdict] += 1
    assert days == expected
    assert [row["day"] for row in s["day"]] == sorted((row["day"] for row in s["day"]), reverse=True)


def test_summary_filters_and_top(seeded):
    s = summary(seeded, "--since", "24h", "--top", "1")
    assert sum(r["count"] for r in s["verdict"]) == 5
    assert s["refused_ip"] == [{"ip": "198.51.100.7", "count": 2}]
    assert s["refused_extension"] == [{"extension": "1001@tenant-a.test", "count": 2, "ips": 2}]
    s = summary(seeded, "--domain", "tenant-b.test")
    assert {(r["verdict"], r["reason"]) for r in s["verdict"]} == {("allow", "observe"), ("deny", "not-registered")}


def test_summary_table_and_csv(seeded):
    text = audit(seeded, "summary")
    assert max(len(line) for line in text.splitlines()) <= 80
    for title in ("Decisions by verdict and reason", "Top refused client IPs", "Top refused extensions",
                  "Per day (UTC)"):
        assert title in text
    assert "1001@tenant-a.test" in text and "203.0.113.45" in text
    rows = list(csv.DictReader(io.StringIO(audit(seeded, "summary", "--format", "csv"))))
    assert {r["section"] for r in rows} == {"verdict", "refused_ip", "refused_extension", "day"}
    assert sum(int(r["count"]) for r in rows if r["section"] == "day") == 8


def test_purge(seeded):
    output = audit(seeded, "purge", "--older-than", "30d")
    assert "deleted 1 decisions" in output
    assert listed(seeded) == [7, 6, 5, 4, 3, 2, 1]
    assert "deleted 0 decisions" in audit(seeded, "purge", "--older-than", "30d")
    assert "deleted 2 decisions" in audit(seeded, "purge", "--older-than", "48h")
    assert listed(seeded) == [7, 6, 5, 4, 3]


def test_purge_in_chunks(seeded):
    from fsguard.audit.queries import purge

    with connect(seeded) as connection:
        assert purge(connection, NOW - timedelta(hours=1), chunk=2) == 6
    assert listed(seeded) == [7, 6]


@pytest.mark.parametrize("args, message", [
    (["list", "--since", "yesterday"], "neither a duration"),
    (["list", "--verdict", "maybe"], "'maybe' is not one of"),
    (["purge"], "Missing option '--older-than'"),
    (["list", "--limit", "0"], "--limit"),
])
def test_bad_arguments(args, message, sqlite_url):
    result = CliRunner().invoke(main, ["audit", *args, "--url", sqlite_url])
    assert result.exit_code == 2 and message in result.output


def test_audit_reads_the_config(seeded, tmp_path):
    config = tmp_path / "fsguard.toml"
    config.write_text(f'[[switch]]\nname = "fs1"\npassword = "x"\n[audit]\nurl = "{seeded}"\n')
    result = CliRunner().invoke(main, ["audit", "list", "--config", str(config), "--format", "json", "--limit", "1"])
    assert result.exit_code == 0 and json.loads(result.output)["call_uuid"] == "call-000007"
