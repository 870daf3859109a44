"""The spool: ordered by sequence number whatever the order of appends, durable, idempotent."""

import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fsguard.audit.spool import DEFAULT_SPOOL, Spool, SpoolError, spool_path


def row(n):
    return {"record_id": uuid.uuid4(), "at": datetime(2024, 5, 1, tzinfo=UTC), "call_uuid": f"call-{n}"}


def test_rows_come_back_by_sequence_number(tmp_path):
    spool = Spool(tmp_path / "s.spool")
    spool.append([(n, row(n)) for n in (5, 6, 7)])
    spool.append([(n, row(n)) for n in (1, 2, 3, 4)])  # an in-flight batch that failed later
    assert spool.rows == 7
    assert [seq for seq, _ in spool.head(4)] == [1, 2, 3, 4]
    spool.remove([1, 2, 3, 4])
    assert [(seq, r["call_uuid"]) for seq, r in spool.head(10)] == [(5, "call-5"), (6, "call-6"), (7, "call-7")]
    assert spool.last_seq() == 7


def test_survives_reopening_and_ignores_a_sequence_number_kept_twice(tmp_path):
    spool = Spool(tmp_path / "s.spool")
    items = [(n, row(n)) for n in range(1, 101)]
    spool.append(items)
    spool.close()
    again = Spool(tmp_path / "s.spool")
    assert again.rows == 100 and again.last_seq() == 100
    again.append(items[:10])
    assert again.rows == 100
    assert again.head(1)[0][1] == items[0][1]


def test_rejected_rows_leave_the_queue_but_keep_their_number(tmp_path):
    spool = Spool(tmp_path / "s.spool")
    spool.append([(1, row(1)), (2, row(2))])
    spool.reject([(2, row(2))], "CheckViolation: verdict")
    spool.reject([(3, row(3))], "never spooled")
    assert spool.rows == 1 and [seq for seq, _, _ in spool.rejected()] == [2, 3]
    spool.remove([1])
    assert spool.rows == 0 and spool.last_seq() == 3  # numbering never goes back


def test_an_emptied_spool_gives_the_disk_back(tmp_path):
    spool = Spool(tmp_path / "s.spool")
    big = [(n, {**row(n), "user_agent": "x" * 1000}) for n in range(1, 3001)]
    spool.append(big)
    assert spool.size_bytes() > 2_000_000
    spool.remove(seq for seq, _ in big)
    assert spool.rows == 0 and spool.size_bytes() < 100_000


def test_its_directory_is_created(tmp_path):
    assert Spool(tmp_path / "var" / "lib" / "fsguard" / "audit.spool").rows == 0


@pytest.mark.parametrize("name", ["a-directory", "not-a-database"])
def test_unusable_spool_is_a_clear_error(tmp_path, name):
    (tmp_path / "a-directory").mkdir()
    (tmp_path / "not-a-database").write_bytes(b"garbage" * 1000)
    with pytest.raises(SpoolError, match="cannot open the audit spool"):
        Spool(tmp_path / name)


@pytest.mark.parametrize("url, spool, expected", [
    ("sqlite:////var/lib/fsguard/audit.db", "", "/var/lib/fsguard/audit.spool"),
    ("sqlite:///var/audit.db", "", "var/audit.spool"),
    ("sqlite:////data/audit.spool", "", "/data/audit.spool.spool"),
    ("postgresql+psycopg://fsguard@db/fsguard", "", DEFAULT_SPOOL),
    ("sqlite://", "", DEFAULT_SPOOL),
    ("postgresql+psycopg://fsguard@db/fsguard", "/srv/spool.db", "/srv/spool.db"),
])
def test_where_the_spool_is(url, spool, expected):
    assert spool_path(url, spool) == Path(expected)
