"""Fixtures and helpers of the audit tests; test modules import the fixtures they use.

* ``postgres``: the real PostgreSQL at 127.0.0.1:5432 (or ``FSGUARD_TEST_POSTGRES``,
  a URL to a database the tests may CREATE DATABASE from).  Every database
  made here is called ``fsguard_test_<random>`` and dropped at the end of the
  session.  If PostgreSQL cannot be reached the tests FAIL, saying so: they
  are never skipped.
* ``sqlite_url`` / ``pg_url`` / ``db_url``: a database at the migrations'
  head, empty at the start of each test.
* ``TcpProxy``: a relay in front of PostgreSQL that a test can stall (bytes
  held, connections hang) or cut (connections closed), to exercise the
  writer against a real, misbehaving database.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import gevent
import pytest
import sqlalchemy as sa
from gevent.event import Event
from gevent.server import StreamServer
from sqlalchemy.engine import URL, make_url

from fsguard.audit import store
from fsguard.audit.models import AuditRecord
from fsguard.audit.store import connect, safe_url
from fsguard.call import CallFacts
from fsguard.guard import Decision, Guard
from fsguard.policy import Action, Policy, Reason, Verdict
from fsguard.registrations import Binding, Registrations

ADMIN_URL = os.environ.get("FSGUARD_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
T0 = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)


class Postgres:
    """Throw-away databases on the test server."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = make_url(admin_url)
        self.engine = sa.create_engine(self.admin_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool,
                                       connect_args={"connect_timeout": 5})
        self.created: list[str] = []
        error = ""
        try:
            with self.engine.connect() as connection:
                connection.execute(sa.text("SELECT 1"))
        except sa.exc.DBAPIError as exc:
            error = str(exc.orig).strip()
        if error:  # failed, never skipped: these tests are the proof that PostgreSQL works
            pytest.fail(
                f"PostgreSQL at {safe_url(self.admin_url)} is unreachable ({error}).  The audit tests need a real "
                "PostgreSQL: start it (./dev.sh test does) or point FSGUARD_TEST_POSTGRES at one.",
                pytrace=False,
            )

    def create_database(self, prefix: str = "fsguard_test_") -> URL:
        name = f"{prefix}{secrets.token_hex(6)}"
        with self.engine.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
        self.created.append(name)
        return self.admin_url.set(database=name)

    def drop_all(self) -> None:
        with self.engine.connect() as connection:
            for name in self.created:
                connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self.engine.dispose()


def upgrade(url: str | URL, revision: str = "head") -> None:
    store.upgrade(url, revision)


def clear(url: str | URL) -> None:
    with connect(url) as connection:
        connection.execute(sa.text("DELETE FROM decision"))
        connection.commit()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    server = Postgres(ADMIN_URL)
    yield server
    server.drop_all()


@pytest.fixture(scope="session")
def pg_head(postgres: Postgres) -> str:
    url = postgres.create_database()
    upgrade(url)
    return url.render_as_string(hide_password=False)


@pytest.fixture
def pg_url(pg_head: str) -> str:
    clear(pg_head)
    return pg_head


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    upgrade(url)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request) -> str:
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


# --- records


def decision(
    n: int = 0,
    *,
    action: Action = Action.DENY,
    reason: Reason = Reason.IP_NOT_REGISTERED,
    rule: Reason | None = None,
    registered: tuple[str, ...] = ("192.0.2.10",),
    lookup: str = "cache",
    latency: float = 0.0012,
    client_ip: str = "",
    **call: str,
) -> Decision:
    facts = {
        "uuid": f"call-{n:06d}",
        "source_ip": "203.0.113.45",
        "source_port": "5060",
        "auth_user": "1001",
        "auth_realm": "tenant-a.test",
        "destination": "00442030001234",
        "from_user": "1001",
        "domain": "tenant-a.test",
        "profile": "internal",
        "user_agent": "Yealink SIP-T46S",
        **call,
    }
    verdict = Verdict(action, reason, rule or reason, registered, client_ip)
    return Decision(CallFacts(**facts), verdict, lookup, latency)


def record(n: int = 0, *, at: datetime | None = None, mode: str = "enforce", switch: str = "fs1",
           **kwargs) -> AuditRecord:
    return AuditRecord.from_decision(decision(n, **kwargs), mode, switch, at or T0 + timedelta(seconds=n))


def rows_in(url: str, order: str = "id") -> list[sa.Row]:
    with connect(url) as connection:
        return list(connection.execute(sa.text(f"SELECT * FROM decision ORDER BY {order}")))


# --- a misbehaving path to PostgreSQL


class TcpProxy:
    """Relays 127.0.0.1:<port> to ``target``; ``stall`` holds the bytes, ``cut`` closes every connection."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.flowing = Event()
        self.flowing.set()
        self.refusing = False
        self.sockets: set[socket.socket] = set()
        self.server = StreamServer(("127.0.0.1", 0), self._relay)
        self.server.start()
        self.port = self.server.server_port

    def url(self, url: str | URL) -> str:
        return make_url(url).set(host="127.0.0.1", port=self.port).render_as_string(hide_password=False)

    def stall(self) -> None:
        """Connections stay open but nothing passes: every query hangs."""
        self.flowing.clear()

    def resume(self) -> None:
        self.refusing = False
        self.flowing.set()

    def cut(self) -> None:
        """Close every connection and every new one: the database is down."""
        self.refusing = True
        for sock in list(self.sockets):
            self._close(sock)

    def close(self) -> None:
        self.cut()
        self.server.stop()

    def _relay(self, client: socket.socket, _address) -> None:
        if self.refusing:
            client.close()
            return
        upstream = gevent.socket.create_connection(self.target)
        self.sockets |= {client, upstream}
        pumps = [gevent.spawn(self._pump, client, upstream), gevent.spawn(self._pump, upstream, client)]
        gevent.joinall(pumps)
        for sock in (client, upstream):
            self._close(sock)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                self.flowing.wait()
                if self.refusing:
                    break
                sink.sendall(data)
        except OSError:
            pass
        self._close(source)
        self._close(sink)

    def _close(self, sock: socket.socket) -> None:
        self.sockets.discard(sock)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()


@pytest.fixture
def proxy(pg_url: str) -> Iterator[TcpProxy]:
    url = make_url(pg_url)
    relay = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
    yield relay
    relay.close()


def closed_port() -> int:
    """A local port nothing listens on: connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- verdicts decided while the writer works (tests and benchmarks/audit_bench.py)


class Registered:
    """Registrations as the cache answers them: after a switch to the hub, like real I/O."""

    def lookup(self, profile, user, domain):
        gevent.sleep(0)
        binding = Binding(user, domain, "c1", "192.0.2.10", "5060", profile)
        return Registrations(f"{user}@{domain}", (binding,), "cache")

    lookup_live = lookup


def verdict_latencies(writer, calls: int, first: int) -> list[float]:
    """Calls arriving every millisecond, each decided (and audited, unless ``writer`` is None) in its
    own greenlet, like the daemon: their latencies in seconds, sorted."""
    guard = Guard(Policy(), Registered(), decision_timeout=1.0)
    latencies: list[float] = []

    def one(n: int, arrived: float) -> None:
        d = guard.decide(decision(n).call)
        if writer is not None:
            writer.submit(AuditRecord.from_decision(d, "enforce", "fs1", datetime.now(UTC)))
        latencies.append(time.perf_counter() - arrived)

    jobs = []
    for n in range(first, first + calls):
        jobs.append(gevent.spawn(one, n, time.perf_counter()))
        gevent.sleep(0.001)
    gevent.joinall(jobs)
    return sorted(latencies)
