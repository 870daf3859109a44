"""FreeSWITCH's inbound role: the event socket (port 8021), simulated.

fsguard connects here to ask for registrations and to follow sofia events.
Replies and events are generated in the exact formats of the captures in
``fixtures/freeswitch`` (README there); where the captures are silent the
code says so ("not captured: per FreeSWITCH source").

Public API
----------
``FakeSwitch(host="127.0.0.1", port=0, password="ClueCon", *, rude_rejection=False,
accept_but_silent=False, api_delay=0.0, api_reply=None, late_margin=10, hostname="vm",
profiles=None)``
    ``start() -> FakeSwitch``, ``stop()``, ``.address``, context manager.
    Registration table: ``registrations``, ``add(reg, event=False)``,
    ``remove(call_id)``, ``flush(aor=None, profile=None, event=True)``.
    Events (to connections subscribed with ``event plain|json ...``):
    ``emit_register(reg, refresh=False, attempts=False)``,
    ``emit_unregister(reg, socket_close=False)``, ``emit_expire(reg)``,
    ``emit_register_failure(reg, registration_type="REGISTER", to_user=None, attempts=False)``.
    Lifecycle: ``shutdown(grace=0.0)`` (captured SHUTDOWN sequence, then
    refuses connections until ``start()``), ``drop()`` (abrupt close of
    every client connection).
    Records: ``api_commands`` (command lines after ``api ``/``bgapi ``),
    ``connections`` (accepted count), ``events_sent`` ((name, bytes) pairs).
    Waiting: ``wait_until(predicate, timeout)``, ``wait_subscribed(count, timeout)``.
``Registration(user, realm, *, network_ip, ...)``  one row of sip_registrations.
``xmlstatus(regs, now, late_margin)``  ``sofia xmlstatus profile <p> reg`` body.
``background_job_headers(job_uuid, command, arg)``  BACKGROUND_JOB headers.

Answered api commands: ``version``; ``sofia xmlstatus`` (no args: profile
list, not captured: per mod_sofia source), ``sofia xmlstatus profile <p> reg
[contact-part]`` / ``user <u>@<d>``; ``sofia status`` (not captured: per
source), ``sofia status profile <p> reg|user ...``; ``sofia profile <p>
flush_inbound_reg [call-id|user@realm]``; ``uuid_exists`` (always false).
Other FreeSWITCH commands answer ``-ERR simulator: <cmd> is not simulated``,
unknown ones the captured ``-ERR <cmd> Command not found!``.
"""

from __future__ import annotations

import itertools
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from functools import cache

import gevent
import gevent.event
import gevent.lock
import gevent.server
import gevent.socket

from fsguard.esl.protocol import ProtocolError, decode_value
from fsguard.testing import transcripts as tr

Items = list[tuple[str, str]]  # decoded event headers, in order

VERSION = "FreeSWITCH Version 1.11.3-dev~64bit ( 64bit)\n"  # captured (in-auth-ok)
LINE = "=" * 97  # captured separator of sofia status
PROFILES = {"internal": "sip:mod_sofia@127.0.0.1:5060", "internal-ipv6": "sip:mod_sofia@[::1]:5060"}
# Captured presence-hosts of sofia::register per profile (in-events-plain).
PRESENCE_HOSTS = {"internal": "127.0.0.1,127.0.0.1", "internal-ipv6": "n/a"}
NOT_SIMULATED = frozenset(
    "show status uuid_kill uuid_setvar uuid_getvar uuid_dump originate reloadxml fsctl eval expand "
    "global_getvar hupall sched_api sofia_contact user_exists".split()
)


def _bracket(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def _amp(text: str) -> str:
    """switch_amp_encode: captured for " & < > (' per source)."""
    table = {"&": "&amp;", '"': "&quot;", "'": "&apos;", "<": "&lt;", ">": "&gt;"}
    return "".join(table.get(c, c) for c in text)


@dataclass
class Registration:
    """One registration (a sip_registrations row, keyed by Call-ID)."""

    user: str
    realm: str
    _: KW_ONLY
    network_ip: str
    network_port: int = 5060
    call_id: str = ""  # default: random, @network_ip
    user_agent: str = "fsguard-sim/1.0"
    profile: str = "internal"
    contact: str | None = None  # default as captured: "" <sip:user@ip:port;transport=UDP>
    expires: int = 3600
    transport: str = "UDP"
    host: str = "vm"  # FreeSWITCH hostname column
    rpid: str = "unknown"
    registered_at: float = field(default_factory=time.time)
    variables: Items | None = None  # directory variables; default FusionPBX-like (captured)

    def __post_init__(self) -> None:
        if not self.call_id:
            self.call_id = f"{uuidlib.uuid4().hex[:16]}@{self.network_ip}"
        if self.contact is None:
            host = f"{_bracket(self.network_ip)}:{self.network_port}"
            self.contact = f'"" <sip:{self.user}@{host};transport={self.transport}>'
        if self.variables is None:
            self.variables = directory_variables(self.user, self.realm)

    @property
    def aor(self) -> str:
        return f"{self.user}@{self.realm}"

    def expires_at(self, late_margin: int) -> int:
        # Captured: expsecs = expires + late margin (10 in the test bed) - elapsed.
        return int(self.registered_at) + self.expires + late_margin


# --------------------------------------------------------------------------
# Templates taken from the captures.


def _items(body: bytes) -> Items:
    """Decoded header lines of a plain event body (duplicates kept)."""
    block = body.partition(b"\n\n")[0]
    return [(name, decode_value(raw)) for name, raw in tr.parse_headers(block)]


@cache
def _templates() -> dict[str, Items]:
    """First captured event of each kind, keyed by subclass (+variant)."""
    found: dict[str, Items] = {}
    for name in ("in-events-plain", "in-freeswitch-shutdown", "in-api-registrations"):
        for message in tr.load(name).messages(tr.FS):
            event = message.event()
            if event is None:
                continue
            key = event.subclass or event.name
            if event.get("update-reg"):
                key += "+refresh"
            found.setdefault(key, _items(message.body))
    return found


_META = ("Event-Date-Local", "Event-Date-GMT", "Event-Date-Timestamp", "Event-Sequence", "Core-UUID")
_sequence = itertools.count(3000)  # Event-Sequence continues past the captured ones
_CAPTURED_CORE_UUID = "c9448b16-bed7-421d-9732-b982737fade7"  # in-events-plain


def _meta(core_uuid: str, now: float | None = None) -> dict[str, str]:
    now = time.time() if now is None else now
    return {
        "Event-Date-Local": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)),
        "Event-Date-GMT": time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now)),
        "Event-Date-Timestamp": str(int(now * 1_000_000)),
        "Event-Sequence": str(next(_sequence)),
        "Core-UUID": core_uuid,
    }


@cache
def _directory_template() -> tuple[Items, str, str]:
    """Directory variables of the captured 1001@tenant-a.test register event."""
    items = _templates()["sofia::register"]
    values = dict(items)
    start = [n for n, _ in items].index("user-agent") + 1
    return items[start:], values["username"], values["realm"]


@cache
def _known_uuids() -> dict[tuple[str, str], tuple[str, str]]:
    """domain_uuid/extension_uuid per user@realm, from the captured events."""
    known = {}
    for name in ("in-events-plain", "in-events-json", "in-api-hostile-callid"):
        for message in tr.load(name).messages(tr.FS):
            event = message.event()
            if event is not None and event.get("extension_uuid"):
                key = (event.get("username") or "", event.get("realm") or "")
                known[key] = (event.get("domain_uuid") or "", event.get("extension_uuid") or "")
    return known


def directory_variables(user: str, realm: str) -> Items:
    """FusionPBX-like directory variables, shaped like the captured ones."""
    template, t_user, t_realm = _directory_template()
    domain_uuid, extension_uuid = _known_uuids().get((user, realm), (
        str(uuidlib.uuid5(uuidlib.NAMESPACE_DNS, realm)),
        str(uuidlib.uuid5(uuidlib.NAMESPACE_DNS, f"{user}@{realm}")),
    ))
    out: Items = []
    for name, value in template:
        if name == "domain_uuid":
            value = domain_uuid
        elif name == "extension_uuid":
            value = extension_uuid
        elif value == t_realm:
            value = realm
        elif value == t_user:
            value = user
        elif value == f"{t_user}@{t_realm}":
            value = f"{user}@{realm}"
        elif value.endswith(f" {t_user}"):  # "Extension 1001"
            value = value[: -len(t_user)] + user
        out.append((name, value))
    return out


def _fill(template: Items, values: dict[str, str], core_uuid: str, directory: Items | None = None) -> Items:
    """Template order and names; values from ``values``/``directory``."""
    meta = _meta(core_uuid)
    dir_names = {n for n, _ in _directory_template()[0]}
    out: Items = []
    directory_done = False
    for name, value in template:
        if name in dir_names:
            if directory is not None and not directory_done:
                out.extend(directory)
                directory_done = True
            continue
        out.append((name, meta.get(name, values.get(name, value))))
    return out


def background_job_headers(job_uuid: str, command: str, arg: str, core_uuid: str = _CAPTURED_CORE_UUID) -> Items:
    """BACKGROUND_JOB headers as captured (Job-Command-Arg only with an arg)."""
    values = {"Job-UUID": job_uuid, "Job-Command": command, "Job-Command-Arg": arg}
    items = _fill([i for i in _templates()["BACKGROUND_JOB"] if i[0] != "Content-Length"], values, core_uuid)
    return [(n, v) for n, v in items if n != "Job-Command-Arg" or arg]


# --------------------------------------------------------------------------
# API output formats.


def _exp_local(expires_at: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(expires_at))


def _registration_xml(reg: Registration, now: float, late_margin: int) -> str:
    exp = reg.expires_at(late_margin)
    # Captured: only contact and agent are escaped; call-id is emitted raw.
    return (
        "    <registration>\n"
        f"        <call-id>{reg.call_id}</call-id>\n"
        f"        <user>{reg.aor}</user>\n"
        f"        <contact>{_amp(reg.contact or '')}</contact>\n"
        f"        <agent>{_amp(reg.user_agent)}</agent>\n"
        f"        <status>Registered({reg.transport})({reg.rpid}) "
        f"exp({_exp_local(exp)}) expsecs({exp - int(now)})</status>\n"
        "        <ping-status>Reachable</ping-status>\n"
        "        <ping-time>0.00</ping-time>\n"
        f"        <host>{reg.host}</host>\n"
        f"        <network-ip>{reg.network_ip}</network-ip>\n"
        f"        <network-port>{reg.network_port}</network-port>\n"
        f"        <sip-auth-user>{reg.user}</sip-auth-user>\n"
        f"        <sip-auth-realm>{reg.realm}</sip-auth-realm>\n"
        f"        <mwi-account>{reg.aor}</mwi-account>\n"
        "    </registration>\n"
    )


def xmlstatus(regs: list[Registration], now: float | None = None, late_margin: int = 10) -> str:
    """Body of ``sofia xmlstatus profile <p> reg`` (captured format)."""
    now = time.time() if now is None else now
    rows = "".join(_registration_xml(r, now, late_margin) for r in regs)
    return (
        '<?xml version="1.0" encoding="ISO-8859-1"?>\n<profile>\n  <registrations>\n'
        f"{rows}  </registrations>\n</profile>\n"
    )


def _registration_text(reg: Registration, now: float, late_margin: int) -> str:
    exp = reg.expires_at(late_margin)
    return (
        f"Call-ID:    \t{reg.call_id}\n"
        f"User:       \t{reg.aor}\n"
        f"Contact:    \t{reg.contact}\n"
        f"Agent:      \t{reg.user_agent}\n"
        f"Status:     \tRegistered({reg.transport})({reg.rpid}) EXP({_exp_local(exp)}) EXPSECS({exp - int(now)})\n"
        "Ping-Status:\tReachable\n"
        "Ping-Time:\t0.00\n"
        f"Host:       \t{reg.host}\n"
        f"IP:         \t{reg.network_ip}\n"
        f"Port:       \t{reg.network_port}\n"
        f"Auth-User:  \t{reg.user}\n"
        f"Auth-Realm: \t{reg.realm}\n"
        f"MWI-Account:\t{reg.aor}\n\n"
    )


def status_reg(regs: list[Registration], now: float | None = None, late_margin: int = 10) -> str:
    """Body of ``sofia status profile <p> reg`` (captured format)."""
    now = time.time() if now is None else now
    rows = "".join(_registration_text(r, now, late_margin) for r in regs)
    return f"\nRegistrations:\n{LINE}\n{rows}Total items returned: {len(regs)}\n{LINE}\n"


def _select(regs: list[Registration], what: str | None, arg: str | None) -> list[Registration] | None:
    """mod_sofia's SQL filters: ``reg <contact part>`` / ``user [u]@[host]``."""
    if what == "reg":
        return [r for r in regs if arg is None or arg in (r.contact or "")]
    if what == "user":
        if arg is None:
            return regs
        user, at, host = arg.partition("@")
        if not at:
            user, host = "", user  # mod_sofia: no '@' means a host
        return [r for r in regs if (not user or r.user == user) and (not host or r.realm == host)]
    return None


# --------------------------------------------------------------------------
# Connections.


class _Conn:
    """One inbound ESL connection."""

    def __init__(self, sock: gevent.socket.socket) -> None:
        self.sock = sock
        self.sub = tr.Subscription()
        self.filters: list[tuple[str, str]] = []
        self.authed = False
        self.closed = gevent.event.Event()
        self.lock = gevent.lock.Semaphore()

    def send(self, data: bytes) -> bool:
        if self.closed.is_set():
            return False
        with self.lock:  # keep messages from different greenlets whole
            try:
                self.sock.sendall(data)
                return True
            except OSError:
                self.close()
                return False

    def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        try:
            self.sock.shutdown(gevent.socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def passes(self, items: Items) -> bool:
        if not self.filters:
            return True
        values = dict(items)  # simplified mod_event_socket filter: any match passes
        return any(values.get(h, "").lower() == v.lower() for h, v in self.filters)


class FakeSwitch:
    """The inbound event socket of a FusionPBX-like FreeSWITCH 1.11.3."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        password: str = "ClueCon",
        *,
        rude_rejection: bool = False,
        accept_but_silent: bool = False,
        api_delay: float = 0.0,
        api_reply: bytes | str | None = None,
        late_margin: int = 10,
        hostname: str = "vm",
        profiles: dict[str, str] | None = None,
        core_uuid: str = _CAPTURED_CORE_UUID,
    ) -> None:
        self.host = host
        self.port = port
        self.password = password
        self.rude_rejection = rude_rejection
        self.accept_but_silent = accept_but_silent
        self.api_delay = api_delay
        self.api_reply = api_reply
        self.late_margin = late_margin
        self.hostname = hostname
        self.profiles = dict(PROFILES if profiles is None else profiles)
        self.core_uuid = core_uuid
        self.api_commands: list[str] = []
        self.connections = 0
        self.events_sent: list[tuple[str, bytes]] = []
        self._table: dict[str, Registration] = {}
        self._conns: set[_Conn] = set()
        self._server: gevent.server.StreamServer | None = None
        self._change = gevent.event.Event()

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> FakeSwitch:
        if self._server is None:
            self._server = gevent.server.StreamServer((self.host, self.port), self._handle)
            self._server.start()
            self.port = self._server.address[1]  # a restart reuses the port
        return self

    def stop(self) -> None:
        self.drop()
        self._stop_listening()

    def _stop_listening(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop(timeout=1)

    def __enter__(self) -> FakeSwitch:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def drop(self) -> None:
        """Close every client connection abruptly (no notice)."""
        for conn in list(self._conns):
            conn.close()
        self._notify()

    def shutdown(self, grace: float = 0.0) -> None:
        """Captured (in-freeswitch-shutdown): SHUTDOWN event, notice, close.

        The listening socket is closed too: connecting fails until start().
        Registrations are kept (captured: they survive a restart).
        """
        self._broadcast(_fill(_templates()["SHUTDOWN"], {}, self.core_uuid))
        if grace:
            gevent.sleep(grace)  # captured: ~1.1 s between the two
        for conn in list(self._conns):
            conn.send(tr.disconnect_notice(None, tr.SHUTTING_DOWN))
            conn.close()
        self._stop_listening()
        self._notify()

    # -- waiting -------------------------------------------------------------

    def _notify(self) -> None:
        event, self._change = self._change, gevent.event.Event()
        event.set()

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Wait until ``predicate()`` holds (re-checked on every change)."""
        deadline = time.monotonic() + timeout
        while True:
            change = self._change
            if predicate():
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            change.wait(remaining)

    def wait_subscribed(self, count: int = 1, timeout: float = 5.0) -> bool:
        return self.wait_until(lambda: self.subscribers >= count, timeout)

    @property
    def subscribers(self) -> int:
        return sum(1 for c in self._conns if c.authed and c.sub.active)

    # -- registrations ---------------------------------------------------------

    @property
    def registrations(self) -> list[Registration]:
        return list(self._table.values())

    def add(self, reg: Registration, event: bool = False) -> None:
        """Insert or replace (same Call-ID: a refresh keeps its place)."""
        refresh = reg.call_id in self._table
        self._table[reg.call_id] = reg
        if event:
            self.emit_register(reg, refresh=refresh)

    def remove(self, call_id: str) -> Registration | None:
        return self._table.pop(call_id, None)

    def flush(self, aor: str | None = None, profile: str | None = None, event: bool = True) -> list[Registration]:
        """flush_inbound_reg: drop matching rows; captured: fires sofia::expire."""
        gone = [
            r for r in self._table.values()
            if (profile is None or r.profile == profile) and (aor is None or aor in (r.aor, r.call_id))
        ]
        for reg in gone:
            del self._table[reg.call_id]
            if event:
                self.emit_expire(reg)
        return gone

    # -- events --------------------------------------------------------------

    def _reg_values(self, reg: Registration) -> dict[str, str]:
        return {
            "profile-name": reg.profile, "from-user": reg.user, "from-host": reg.realm,
            "presence-hosts": PRESENCE_HOSTS.get(reg.profile, "n/a"), "contact": reg.contact or "",
            "call-id": reg.call_id, "rpid": reg.rpid, "status": f"Registered({reg.transport})",
            "expires": str(reg.expires), "to-user": reg.user, "to-host": reg.realm,
            "network-ip": reg.network_ip, "network-port": str(reg.network_port),
            "username": reg.user, "realm": reg.realm, "user-agent": reg.user_agent,
            "user": reg.user, "host": reg.realm, "auth-result": "RENEWED",
        }

    def _attempts(self, reg: Registration, values: dict[str, str]) -> None:
        for kind in ("sofia::pre_register", "sofia::register_attempt"):
            self._broadcast(_fill(_templates()[kind], values, self.core_uuid))

    def emit_register(self, reg: Registration, refresh: bool = False, attempts: bool = False) -> None:
        """sofia::register (captured; ``update-reg: true`` on a refresh)."""
        values = self._reg_values(reg)
        if attempts:
            self._attempts(reg, values)
        kind = "sofia::register+refresh" if refresh else "sofia::register"
        self._broadcast(_fill(_templates()[kind], values, self.core_uuid, reg.variables))

    def emit_unregister(self, reg: Registration, socket_close: bool = False) -> None:
        """sofia::unregister: REGISTER with Expires 0 (captured), or TCP/WS close.

        The socket-close variant is not captured: per FreeSWITCH source
        (sofia.c) it has only profile-name, from-user, from-host, call-id,
        rpid and ``reason: socket-disconnection`` - no network-ip, contact,
        user-agent or expires.
        """
        if socket_close:
            prefix = [i for i in _templates()["sofia::unregister"] if not i[0][0].islower()]
            calling = {"Event-Calling-File": "sofia.c", "Event-Calling-Function": "our_sofia_event_callback",
                       "Event-Calling-Line-Number": "0"}  # line number unknown (not captured)
            values = {"profile-name": reg.profile, "from-user": reg.user, "from-host": reg.realm,
                      "call-id": reg.call_id, "rpid": "unknown", "reason": "socket-disconnection"}
            template = [(n, calling.get(n, v)) for n, v in prefix] + list(values.items())
            self._broadcast(_fill(template, {}, self.core_uuid))
            return
        values = self._reg_values(reg) | {"expires": "0"}
        self._broadcast(_fill(_templates()["sofia::unregister"], values, self.core_uuid, reg.variables))

    def emit_expire(self, reg: Registration) -> None:
        """sofia::expire (captured): ``user``/``host`` names, absolute ``expires``."""
        values = self._reg_values(reg) | {"expires": str(reg.expires_at(self.late_margin))}
        self._broadcast(_fill(_templates()["sofia::expire"], values, self.core_uuid))

    def emit_register_failure(self, reg: Registration, registration_type: str = "REGISTER",
                              to_user: str | None = None, attempts: bool = False) -> None:
        """sofia::register_failure (captured; INVITE: to-user = dialed number)."""
        values = self._reg_values(reg) | {"registration-type": registration_type}
        if attempts:
            attempt = values | {"auth-result": "FORBIDDEN"}
            if to_user is not None:
                # Captured (INVITE): from-user = dialed number, expires 300.
                attempt |= {"from-user": to_user, "expires": "300"}
            self._attempts(reg, attempt)
        if to_user is not None:
            values["to-user"] = to_user
        self._broadcast(_fill(_templates()["sofia::register_failure"], values, self.core_uuid))

    def _broadcast(self, items: Items, body: bytes = b"") -> None:
        values = dict(items)
        name, subclass = values.get("Event-Name", ""), values.get("Event-Subclass", "")
        raw = tr.encode_headers(items)
        for conn in list(self._conns):
            if conn.authed and conn.sub.fmt != "xml" and conn.sub.wants(name, subclass) and conn.passes(items):
                data = tr.event_message(raw, conn.sub.fmt, body)
                if conn.send(data):
                    self.events_sent.append((subclass or name, data))

    # -- connection handling -------------------------------------------------

    def _handle(self, sock: gevent.socket.socket, _address: tuple) -> None:
        conn = _Conn(sock)
        self._conns.add(conn)
        self.connections += 1
        self._notify()
        try:
            if self.accept_but_silent:
                conn.closed.wait()
            elif self.rude_rejection:
                conn.send(tr.load("in-rude-rejection").stream(tr.FS))  # captured bytes
            else:
                self._serve(conn)
        finally:
            conn.close()
            self._conns.discard(conn)
            self._notify()

    def _serve(self, conn: _Conn) -> None:
        conn.send(b"Content-Type: auth/request\n\n")
        reader = tr.RawReader(commands=True)
        while not conn.closed.is_set():
            try:
                data = conn.sock.recv(65536)
                messages = reader.feed(data) if data else None
            except (OSError, ProtocolError):
                return
            if messages is None:
                return
            for message, _raw in messages:
                self._command(conn, message.command.strip())
                if conn.closed.is_set():
                    return

    def _command(self, conn: _Conn, line: str) -> None:
        low = line.lower()
        reply = lambda text: conn.send(tr.command_reply(text))  # noqa: E731
        # Same order and prefix matching as mod_event_socket parse_command.
        if low.startswith(("exit", "...")):
            conn.send(tr.command_reply("+OK bye") + tr.disconnect_notice())  # captured: one chunk
            conn.close()
        elif not conn.authed:
            if low.startswith("auth "):
                self._auth(conn, line[5:])
            else:
                reply("-ERR command not found")
        elif low.startswith("filter "):
            self._filter(conn, line[7:].split(" ", 2))
        elif low.startswith("divert_events"):
            reply("-ERR not controlling a session.")
        elif low.startswith("sendmsg"):
            reply(f"-ERR invalid session id [{line[7:].strip()}]")
        elif low.startswith("api "):
            self._api(conn, line[4:].strip())
        elif low.startswith("bgapi "):
            self._bgapi(conn, line[6:].strip())
        elif low.startswith(("linger", "nolinger")):
            reply("-ERR not controlling a session")
        elif low.startswith("event"):
            reply(tr.parse_subscription(conn.sub, line.split()[1:]))
        elif low.startswith("nixevent"):
            names = {w.upper() for w in line.split()[1:]}
            conn.sub.names -= names
            conn.sub.subclasses -= set(line.split()[1:])
            reply("+OK events nixed" if names & tr.EVENT_NAMES else "-ERR no keywords supplied")
        elif low.startswith("noevents"):
            active = conn.sub.active
            conn.sub = tr.Subscription(fmt=conn.sub.fmt)
            reply("+OK no longer listening for events" if active else "-ERR not listening for events")
        else:
            reply("-ERR command not found")
        self._notify()

    def _auth(self, conn: _Conn, password: str) -> None:
        if password == self.password:
            conn.authed = True
            conn.send(tr.command_reply("+OK accepted"))
        else:
            # Captured (in-auth-bad-password): reply and notice, then close.
            conn.send(tr.command_reply("-ERR invalid") + tr.disconnect_notice())
            conn.close()

    def _filter(self, conn: _Conn, words: list[str]) -> None:
        if words[0].lower() == "delete" and len(words) > 1:
            header, value = words[1], words[2] if len(words) > 2 else ""
            conn.filters = [] if header.lower() == "all" else [f for f in conn.filters if f[0] != header]
            conn.send(tr.command_reply(f"+OK filter deleted. [{header}][{value}]"))
        elif len(words) >= 2:
            header, value = (words[1], words[2]) if words[0].lower() == "add" and len(words) > 2 else words[:2]
            conn.filters.append((header, value))
            conn.send(tr.command_reply(f"+OK filter added. [{header}]=[{value}]"))
        else:
            conn.send(tr.command_reply("-ERR invalid syntax"))

    # -- api -----------------------------------------------------------------

    def _api(self, conn: _Conn, command: str) -> None:
        self.api_commands.append(command)
        self._notify()
        if self.api_delay:
            gevent.sleep(self.api_delay)  # models a slow switch (api blocks the connection)
        body = self.api_reply if self.api_reply is not None else self.api(command)
        conn.send(tr.api_response(body))

    def _bgapi(self, conn: _Conn, command: str) -> None:
        self.api_commands.append(command)
        job = str(uuidlib.uuid4())
        # Captured: Reply-Text and a separate Job-UUID header.
        conn.send(tr.command_reply(f"+OK Job-UUID: {job}", f"Job-UUID: {job}\n"))
        if self.api_delay:
            gevent.sleep(self.api_delay)
        body = self.api_reply if self.api_reply is not None else self.api(command)
        data = body.encode("utf-8") if isinstance(body, str) else body
        name, _, arg = command.partition(" ")
        self._broadcast(background_job_headers(job, name, arg, self.core_uuid), data)

    def api(self, command: str) -> str:
        """The api/response body FreeSWITCH would give for ``command``."""
        name, _, rest = command.partition(" ")
        args = rest.split()
        if name == "version":
            return VERSION
        if name == "sofia":
            return self._sofia(args)
        if name == "uuid_exists":
            return "false"  # the inbound side has no calls
        if name in NOT_SIMULATED:
            return f"-ERR simulator: {name} is not simulated\n"
        return f"-ERR {name} Command not found!\n"  # captured

    def _sofia(self, args: list[str]) -> str:
        sub = args[0].lower() if args else ""
        if sub == "xmlstatus":
            return self._xmlstatus(args[1:])
        if sub == "status":
            return self._status(args[1:])
        if sub == "profile" and len(args) >= 3 and args[2].lower() == "flush_inbound_reg":
            if args[1] not in self.profiles:
                return f"Invalid Profile [{args[1]}]"  # per source, no newline
            target = args[3] if len(args) > 3 else None
            self.flush(target, args[1])
            if target:
                return "+OK flushing all registrations matching specified call_id\n"  # captured
            return "+OK flushing all registrations\n"  # captured
        return f"-ERR simulator: sofia {sub} is not simulated\n"

    def _profile_regs(self, profile: str) -> list[Registration]:
        return [r for r in self._table.values() if r.profile == profile]

    def _xmlstatus(self, args: list[str]) -> str:
        if not args:
            return self._xml_profiles()
        if len(args) == 1:
            return "Invalid Syntax!\n"  # per source
        if args[0].lower() == "gateway":
            return "Invalid Gateway!\n"  # no gateways configured
        if args[0].lower() != "profile":
            return "Invalid Syntax!\n"
        if args[1] not in self.profiles:
            return "Invalid Profile!\n"  # captured
        what = args[2].lower() if len(args) > 2 else None
        regs = _select(self._profile_regs(args[1]), what, args[3] if len(args) > 3 else None)
        if regs is None:
            return "-ERR simulator: profile-info is not simulated\n"
        return xmlstatus(regs, late_margin=self.late_margin)

    def _xml_profiles(self) -> str:
        # Not captured: per mod_sofia cmd_xml_status source.
        rows = "".join(
            f"<profile>\n<name>{name}</name>\n<type>profile</type>\n<data>{url}</data>\n"
            "<state>RUNNING (0)</state>\n</profile>\n"
            for name, url in self.profiles.items()
        )
        return f'<?xml version="1.0" encoding="ISO-8859-1"?>\n<profiles>\n{rows}</profiles>\n'

    def _status(self, args: list[str]) -> str:
        if not args:
            # Not captured: per mod_sofia cmd_status source (FreeSWITCH 1.10+ widths).
            rows = "".join(f"{name:>25}\tprofile\t  {url:>40}\tRUNNING (0)\n" for name, url in self.profiles.items())
            count = len(self.profiles)
            head = f"{'Name':>25}\t{'   Type'}\t  {'Data':>40}\tState\n{LINE}\n"
            return f"{head}{rows}{LINE}\n{count} profile{'' if count == 1 else 's'} 0 aliases\n"
        if args[0].lower() != "profile" or len(args) < 2:
            return "Invalid Syntax!\n"
        if args[1] not in self.profiles:
            return "Invalid Profile!\n"
        what = args[2].lower() if len(args) > 2 else None
        regs = _select(self._profile_regs(args[1]), what, args[3] if len(args) > 3 else None)
        if regs is None:
            return "-ERR simulator: profile-info is not simulated\n"
        return status_reg(regs, late_margin=self.late_margin)
