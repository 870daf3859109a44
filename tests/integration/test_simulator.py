"""The simulators over real sockets (127.0.0.1, port 0), checked against the captures."""

from __future__ import annotations

import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import gevent
import gevent.event
import gevent.server
import gevent.socket
import pytest

from fsguard.esl.protocol import Message, ProtocolError, command, execute, hangup
from fsguard.testing import caller as C
from fsguard.testing import switch as S
from fsguard.testing import transcripts as T

WAIT = 5.0  # every wait in these tests is bounded by this


# ----------------------------------------------------------------- a minimal ESL app


class Peer:
    """One ESL connection seen from the app side (plain gevent socket)."""

    def __init__(self, sock: gevent.socket.socket) -> None:
        self.sock = sock
        self.reader = T.RawReader()
        self.received: list[tuple[Message, bytes]] = []
        self._cursor = 0
        self.eof = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def until(self, predicate: Callable[[Message], bool], timeout: float = WAIT) -> Message:
        """Next message (after the last one returned) matching ``predicate``."""
        with gevent.Timeout(timeout):
            while True:
                while self._cursor < len(self.received):
                    message = self.received[self._cursor][0]
                    self._cursor += 1
                    if predicate(message):
                        return message
                data = self.sock.recv(65536)
                if not data:
                    self.eof = True
                    raise EOFError("peer closed")
                self.received.extend(self.reader.feed(data))

    def reply(self) -> Message:
        return self.until(lambda m: m.is_reply)

    def event(self, name: str) -> Message:
        return self.until(lambda m: (e := m.event()) is not None and name in (e.name, e.subclass))

    def notice(self, disposition: str | None = None, timeout: float = WAIT) -> Message:
        return self.until(lambda m: m.content_type == "text/disconnect-notice"
                          and disposition in (None, m.headers.get("Content-Disposition")), timeout)

    def wait_eof(self, timeout: float = WAIT) -> None:
        with gevent.Timeout(timeout):
            while not self.eof:
                data = self.sock.recv(65536)
                if not data:
                    self.eof = True
                else:
                    self.received.extend(self.reader.feed(data))

    @property
    def raws(self) -> list[bytes]:
        return [raw for _, raw in self.received]


@contextmanager
def esl_app(script: Callable[[Peer], None]) -> Iterator[tuple[tuple[str, int], gevent.event.AsyncResult]]:
    """Listen like fsguard; run ``script`` on the first connection."""
    done = gevent.event.AsyncResult()

    def handle(sock: gevent.socket.socket, _addr: tuple) -> None:
        peer = Peer(sock)
        try:
            script(peer)
            done.set(peer)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            done.set_exception(exc)
        finally:
            sock.close()

    server = gevent.server.StreamServer(("127.0.0.1", 0), handle)
    server.start()
    try:
        yield server.address, done
    finally:
        server.stop(timeout=1)


def run_call(
    script: Callable[[Peer], None], scenario: C.CallScenario, timeout: float = WAIT
) -> tuple[C.CallResult, Peer]:
    with esl_app(script) as (address, done):
        result = C.place_call(address, scenario, timeout=timeout)
        peer = done.get(timeout=WAIT)
    return result, peer


def captured(name: str, **kw: object) -> C.CallScenario:
    return C.CallScenario(base=name, uuid=C.captured_facts(name)["uuid"], **kw)


def _norm(raw: bytes) -> bytes:
    # The only per-execution random value (same length, so Content-Length holds).
    return re.sub(rb"Application-UUID: [0-9a-f-]{36}", b"Application-UUID: X", raw)


def app_commands(name: str) -> list[bytes]:
    return [raw for _, raw in T.load(name).raw_messages(T.APP)]


# ----------------------------------------------------------------- outbound: captured flows


def test_allow_flow_replays_the_capture_exactly() -> None:
    cmds = app_commands(C.ALLOW_BASE)  # connect, myevents, linger, sendmsg set, resume, exit

    def script(peer: Peer) -> None:
        peer.send(cmds[0]); peer.until(lambda m: m.headers.get("Event-Name") == "CHANNEL_DATA")
        peer.send(cmds[1]); peer.reply()
        peer.send(cmds[2]); peer.reply()
        peer.send(cmds[3]); peer.event("CHANNEL_EXECUTE_COMPLETE")
        peer.send(cmds[4]); peer.reply()
        peer.send(cmds[5]); peer.notice("disconnect"); peer.wait_eof()

    result, peer = run_call(script, captured(C.ALLOW_BASE))
    expected = [raw for _, raw in T.load(C.ALLOW_BASE).raw_messages(T.FS)]
    assert [_norm(r) for r in peer.raws] == [_norm(r) for r in expected]
    assert result.commands == cmds
    assert result.sent == peer.raws
    assert result.outcome == "continued" and result.sip_final is None
    assert result.verdict == "allow" and result.closed_by == "switch"
    assert result.resumed and not result.timed_out
    # Captured: the EXECUTE_COMPLETE comes on the next 20 ms frame.
    assert 0.015 <= result.verdict_at - result.connected_at < 1.0


def _deny_script(name: str) -> Callable[[Peer], None]:
    cmds = app_commands(name)  # connect, myevents, linger, <deny...>, exit

    def script(peer: Peer) -> None:
        peer.send(cmds[0]); peer.until(lambda m: m.headers.get("Event-Name") == "CHANNEL_DATA")
        peer.send(cmds[1]); peer.reply()
        peer.send(cmds[2]); peer.reply()
        for deny in cmds[3:-1]:
            peer.send(deny); peer.reply()
        peer.event("CHANNEL_HANGUP_COMPLETE")  # as the captured app did
        peer.send(cmds[-1]); peer.notice("disconnect"); peer.wait_eof()

    return script


@pytest.mark.parametrize("name", ["out-deny-respond-603", "out-deny-hangup-call-rejected"])
def test_deny_flows_replay_the_captured_sequence(name: str) -> None:
    result, peer = run_call(_deny_script(name), captured(name))
    expected = [raw for _, raw in T.load(name).raw_messages(T.FS)]
    kind = lambda raw: b"reply" if b"Content-Type: command/reply" in raw[:40] else b"other"  # noqa: E731
    # Events and notices in the captured order, byte for byte; the replies too.
    assert [_norm(r) for r in peer.raws if kind(r) == b"other"] == [_norm(r) for r in expected if kind(r) == b"other"]
    assert [r for r in peer.raws if kind(r) == b"reply"] == [r for r in expected if kind(r) == b"reply"]
    assert result.commands == app_commands(name)
    assert result.outcome == "rejected" and result.sip_final == "603 Decline"
    assert result.hangup_cause == "CALL_REJECTED" and result.closed_by == "switch"
    assert result.verdict_at is not None


def test_deny_without_linger_closes_after_the_hangup() -> None:
    def script(peer: Peer) -> None:
        peer.send(b"connect\n\n"); peer.reply()
        peer.send(b"myevents\n\n"); peer.reply()
        peer.send(hangup("CALL_REJECTED")); peer.reply()
        peer.notice("disconnect"); peer.wait_eof()

    result, peer = run_call(script, C.CallScenario(source_ip="192.0.2.55"))
    names = [m.event().name for m, _ in peer.received if m.event()]
    assert names[:2] == ["CHANNEL_HANGUP", "CHANNEL_UNPARK"] and "CHANNEL_HANGUP_COMPLETE" not in names
    hang = next(m.event() for m, _ in peer.received if m.event() and m.event().name == "CHANNEL_HANGUP")
    assert hang.get("Caller-Network-Addr") == "192.0.2.55" and hang.get("Unique-ID") == result.uuid
    assert result.outcome == "rejected" and result.closed_by == "switch"


def test_caller_cancels_replays_the_capture() -> None:
    name = "out-caller-cancels"
    cmds = app_commands(name)  # connect, myevents, linger, sendmsg set, resume, api uuid_exists, exit

    def script(peer: Peer) -> None:
        peer.send(cmds[0]); peer.reply()
        peer.send(cmds[1]); peer.reply()
        peer.send(cmds[2]); peer.reply()
        peer.notice("linger")
        for cmd in cmds[3:6]:
            peer.send(cmd); peer.until(lambda m: m.is_reply)
        peer.send(cmds[6]); peer.notice("disconnect"); peer.wait_eof()

    result, peer = run_call(script, captured(name, cancel_after=0.2))
    expected = [raw for _, raw in T.load(name).raw_messages(T.FS)]
    assert [_norm(r) for r in peer.raws] == [_norm(r) for r in expected]
    assert result.outcome == "cancelled" and result.sip_final == "487 Request Terminated"
    assert result.hangup_cause == "ORIGINATOR_CANCEL"
    assert "fsguard_verdict" not in result.variables  # captured: +OK, nothing executed


def _sync_script(name: str) -> Callable[[Peer], None]:
    cmds = app_commands(name)

    def script(peer: Peer) -> None:
        peer.send(cmds[0]); peer.reply()
        peer.send(cmds[1]); peer.reply()
        peer.send(cmds[2]); peer.reply()
        peer.send(cmds[3]); peer.reply(); peer.event("CHANNEL_EXECUTE_COMPLETE")
        for cmd in cmds[4:-1]:
            peer.send(cmd); peer.reply()
        peer.send(cmds[-1]); peer.notice("disconnect"); peer.wait_eof()

    return script


@pytest.mark.parametrize(("name", "outcome"), [("out-sync-mode", "stuck"), ("out-sync-mode-no-resume", "continued")])
def test_sync_mode_resume_leaves_the_call_stuck(name: str, outcome: str) -> None:
    # A huge frame delay proves static mode does not wait for a frame.
    result, peer = run_call(_sync_script(name), captured(name, socket_mode="static", frame_delay=30.0))
    expected = [raw for _, raw in T.load(name).raw_messages(T.FS)]
    assert [_norm(r) for r in peer.raws] == [_norm(r) for r in expected]
    assert result.outcome == outcome and result.sip_final is None
    assert result.verdict == "allow" and result.resumed == (outcome == "stuck")


# ----------------------------------------------------------------- outbound: behaviour


def _prelude(peer: Peer, linger: bool = True) -> Message:
    peer.send(command("connect"))
    data = peer.reply()
    peer.send(command("myevents")); peer.reply()
    if linger:
        peer.send(command("linger")); peer.reply()
    return data


def test_substituted_call_reaches_the_app() -> None:
    seen: dict[str, str] = {}

    def script(peer: Peer) -> None:
        seen.update(_prelude(peer).headers)
        peer.send(execute("set", "fsguard_verdict=allow"))
        peer.reply()
        complete = peer.event("CHANNEL_EXECUTE_COMPLETE").event()
        seen["complete_user"] = complete.get("variable_sip_auth_username")
        seen["complete_verdict"] = complete.get("variable_fsguard_verdict")
        peer.send(command("exit")); peer.wait_eof()

    scenario = C.CallScenario(auth_user="1001", realm="tenant-b.test", source_ip="127.0.0.10",
                              extra={"variable_sip_h_X-AUTH-IP": "10.1.2.3"})
    result, _ = run_call(script, scenario)
    assert seen["variable_sip_auth_realm"] == "tenant-b.test" and seen["Unique-ID"] == scenario.uuid
    assert seen["variable_sip_h_X-AUTH-IP"] == "10.1.2.3"
    assert seen["complete_user"] == "1001" and seen["complete_verdict"] == "allow"
    assert result.outcome == "continued"


def test_substituted_events_do_not_leak_template_facts() -> None:
    def script(peer: Peer) -> None:
        _prelude(peer)
        peer.send(execute("set", "x=1")); peer.event("CHANNEL_EXECUTE_COMPLETE")
        peer.send(execute("respond", "603 Decline")); peer.event("CHANNEL_HANGUP_COMPLETE")
        peer.send(command("exit")); peer.wait_eof()

    scenario = C.CallScenario(auth_user="2002", realm="tenant-c.example", source_ip="198.51.100.7",
                              source_port=6000, destination="5555", user_agent="UA-X")
    result, peer = run_call(script, scenario)
    text = b"".join(peer.raws).decode()
    text = re.sub(r"%([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), text)
    for template in (C.ALLOW_BASE, "out-deny-respond-603"):
        facts = C.captured_facts(template)
        for value in (facts["uuid"], facts["source_ip"], facts["realm"], facts["user_agent"]):
            assert value not in text
    for token in ("1001", "9196", "5070", "5080"):
        assert not re.search(rf"(?<![\w.]){token}(?![\w.])", text), token
    assert result.outcome == "rejected" and len(result.events) == 10


def test_trunk_call_events_carry_no_credentials() -> None:
    def script(peer: Peer) -> None:
        _prelude(peer)
        peer.send(execute("set", "fsguard_verdict=allow")); peer.reply()
        complete = peer.event("CHANNEL_EXECUTE_COMPLETE").event()
        assert complete.get("variable_sip_auth_username") is None
        assert complete.get("variable_sip_acl_authed_by") == "providers"
        peer.send(command("exit")); peer.wait_eof()

    result, _ = run_call(script, C.CallScenario(credentials=False))
    assert result.outcome == "continued" and result.verdict == "allow"


def test_json_events_and_respond_with_other_code() -> None:
    def script(peer: Peer) -> None:
        peer.send(command("connect")); peer.reply()
        peer.send(command("myevents json")); peer.reply()
        peer.send(command("linger")); peer.reply()
        peer.send(execute("respond", "403 Forbidden")); peer.reply()
        message = peer.event("CHANNEL_HANGUP")
        assert message.content_type == "text/event-json" and message.event().get("Hangup-Cause") == "CALL_REJECTED"
        peer.event("CHANNEL_HANGUP_COMPLETE")
        peer.send(command("exit")); peer.wait_eof()

    result, _ = run_call(script, C.CallScenario())
    assert result.outcome == "rejected" and result.sip_final == "403 Forbidden"


def test_api_commands() -> None:
    answers: list[str] = []
    usage = "-USAGE: <uuid> <var>=<value>;<var>=<value>...\n"

    def script(peer: Peer) -> None:
        _prelude(peer)
        uuid = peer.received[0][0].headers["Unique-ID"]
        for line in (f"api uuid_exists {uuid}", "api uuid_exists nope", f"api uuid_setvar {uuid} fsguard_reason ip",
                     "api uuid_setvar nope x y", "api nosuchcommand", f"api uuid_getvar {uuid} fsguard_reason",
                     f"api uuid_setvar_multi {uuid} a=1;=2;b=", f"api uuid_setvar_multi {uuid}",
                     "api uuid_setvar_multi nope a=1", f"api uuid_setvar_multi {uuid} b=2;c=x=y"):
            peer.send(command(line))
            answers.append(peer.reply().text)
        peer.send(command("bogus")); answers.append(peer.reply().reply_text)
        peer.send(command(f"api uuid_kill {uuid} CALL_REJECTED")); answers.append(peer.reply().text)
        peer.event("CHANNEL_HANGUP_COMPLETE")
        peer.send(command(f"api uuid_exists {uuid}")); answers.append(peer.reply().text)
        peer.send(command(f"api uuid_kill {uuid}")); answers.append(peer.reply().text)
        peer.send(command(f"api uuid_setvar_multi {uuid} fsguard_verdict=allow")); answers.append(peer.reply().text)
        peer.send(execute("set", "fsguard_verdict=allow")); answers.append(peer.reply().reply_text)
        peer.send(command("exit")); peer.wait_eof()

    result, _ = run_call(script, C.CallScenario())
    assert answers == [
        "true", "false", "+OK\n", "-ERR No Such Channel!\n", "-ERR nosuchcommand Command not found!\n", "ip",
        "-ERR No variable specified\n+OK\n", "-ERR no reply\n", "-ERR No Such Channel!\n" + usage, "+OK\n",
        "-ERR command not found", "+OK\n", "false", "-ERR No Such Channel!\n", "-ERR No Such Channel!\n" + usage, "+OK",
    ]
    # b= unset b; c=x=y splits at the first '='; nothing after the hangup took effect.
    assert result.variables == {"fsguard_reason": "ip", "a": "1", "b": "2", "c": "x=y"}
    assert result.outcome == "rejected" and result.sip_final == "603 Decline"


def test_park_timeout_rejects_a_call_left_parked() -> None:
    def script(peer: Peer) -> None:
        _prelude(peer)
        peer.event("CHANNEL_HANGUP")
        peer.notice("linger")
        peer.send(command("exit")); peer.wait_eof()

    result, _ = run_call(script, C.CallScenario(park_timeout=0.3))
    assert result.outcome == "rejected" and result.sip_final == "603 Decline"
    assert 0.25 < result.verdict_at - result.connected_at < 2.0


def test_app_closing_without_connect() -> None:
    def script(peer: Peer) -> None:
        pass  # accept and close (captured: out-app-closes-without-connect)

    result, _ = run_call(script, C.CallScenario(), timeout=1.0)
    assert result.outcome == "stuck" and result.closed_by == "app" and not result.timed_out
    result, _ = run_call(script, C.CallScenario(park_timeout=0.2))
    assert result.outcome == "rejected" and result.sip_final == "603 Decline"  # out-app-closes-park-timeout
    result, _ = run_call(script, C.CallScenario(socket_mode="static"))
    assert result.outcome == "continued"


def test_app_closing_after_connect_without_verdict_continues() -> None:
    def script(peer: Peer) -> None:
        _prelude(peer)

    result, _ = run_call(script, C.CallScenario(park_timeout=5))
    # Not captured: per source the park loop ends when the listener goes.
    assert result.outcome == "continued" and result.verdict is None and result.closed_by == "app"


def test_silent_app() -> None:
    def script(peer: Peer) -> None:
        peer.notice("disconnect", timeout=2.0)  # captured: after ~25 s, here 0.2 s
        peer.wait_eof()

    result, peer = run_call(script, C.CallScenario(silent_timeout=0.2), timeout=2.0)
    assert result.outcome == "stuck" and result.closed_by == "switch"
    assert peer.raws == [T.disconnect_notice(result.uuid)]


def test_allow_then_exit_right_away_still_applies_the_queued_set() -> None:
    def script(peer: Peer) -> None:
        _prelude(peer)
        peer.send(execute("set", "fsguard_verdict=allow") + command("exit"))
        peer.wait_eof()

    result, _ = run_call(script, C.CallScenario())
    assert result.outcome == "continued" and result.verdict == "allow"


def test_nothing_listening_fails_open() -> None:
    sock = gevent.socket.socket()
    sock.bind(("127.0.0.1", 0))
    address = sock.getsockname()
    sock.close()
    result = C.place_call(address, C.CallScenario(), timeout=1.0)
    assert result.refused and result.outcome == "continued"


def test_timeout_while_the_app_holds_the_call() -> None:
    release = gevent.event.Event()

    def script(peer: Peer) -> None:
        _prelude(peer)
        release.wait(WAIT)

    with esl_app(script) as (address, done):
        result = C.place_call(address, C.CallScenario(), timeout=0.3)
        release.set()
        done.get(timeout=WAIT)
    assert result.timed_out and result.outcome == "stuck" and result.closed_by == "switch"


@pytest.mark.parametrize(
    "fault", ["close_on_accept", "close_mid_channel_data", "garbage_channel_data", "no_connect_reply"]
)
def test_faults(fault: str) -> None:
    def script(peer: Peer) -> None:
        peer.send(command("connect"))
        try:
            peer.until(lambda m: False, timeout=0.3)
        except (EOFError, gevent.Timeout, ProtocolError):
            pass  # what a broken switch does to the app is the point

    result, peer = run_call(script, C.CallScenario(fault=fault), timeout=1.0)
    assert result.outcome == "aborted"
    if fault == "close_mid_channel_data":
        assert peer.eof and result.closed_by == "switch"


def test_err_on_and_first_command_not_connect() -> None:
    def script(peer: Peer) -> None:
        peer.send(command("myevents"))  # first command: processed, no reply (per source)
        peer.send(command("connect")); peer.until(lambda m: m.headers.get("Event-Name") == "CHANNEL_DATA")
        peer.send(command("linger")); assert peer.reply().reply_text == "-ERR simulated failure"
        peer.send(command("myevents")); assert peer.reply().reply_text == "-ERR aready enabled."
        peer.send(command("exit")); peer.wait_eof()

    result, peer = run_call(script, C.CallScenario(err_on=("linger",)))
    assert result.command_lines == ["myevents", "connect", "linger", "myevents", "exit"]
    assert peer.received[0][0].headers.get("Event-Name") == "CHANNEL_DATA"


def test_place_calls_concurrently() -> None:
    def handle(sock: gevent.socket.socket, _addr: tuple) -> None:
        peer = Peer(sock)
        data = _prelude(peer)
        if data.headers["Caller-Network-Addr"] == "127.0.0.10":
            peer.send(execute("set", "fsguard_verdict=allow")); peer.reply()
            peer.event("CHANNEL_EXECUTE_COMPLETE")
        else:
            peer.send(hangup("CALL_REJECTED")); peer.reply()
            peer.event("CHANNEL_HANGUP_COMPLETE")
        peer.send(command("exit")); peer.wait_eof()
        sock.close()

    server = gevent.server.StreamServer(("127.0.0.1", 0), handle)
    server.start()
    try:
        scenarios = [C.CallScenario(source_ip="127.0.0.10" if i % 2 else "127.0.0.20") for i in range(12)]
        results = C.place_calls(server.address, scenarios, concurrency=6, timeout=WAIT)
    finally:
        server.stop(timeout=1)
    assert [r.outcome for r in results] == ["rejected" if i % 2 == 0 else "continued" for i in range(12)]
    assert len({r.uuid for r in results}) == 12


# ----------------------------------------------------------------- inbound: FakeSwitch


def replay_inbound(name: str, switch: S.FakeSwitch) -> bytes:
    """Send a capture's client commands; return everything the switch sent."""
    sock = gevent.socket.create_connection(switch.address, timeout=WAIT)
    received = b""
    try:
        with gevent.Timeout(WAIT):
            for raw in app_commands(name):
                sock.sendall(raw)
            while chunk := sock.recv(65536):
                received += chunk
    finally:
        sock.close()
    return received


def test_auth_ok_is_byte_exact() -> None:
    with S.FakeSwitch() as switch:
        assert replay_inbound("in-auth-ok", switch) == T.load("in-auth-ok").stream(T.FS)
        assert switch.api_commands == ["version"]


def test_bad_password_is_byte_exact() -> None:
    with S.FakeSwitch() as switch:
        assert replay_inbound("in-auth-bad-password", switch) == T.load("in-auth-bad-password").stream(T.FS)


def test_rude_rejection_is_byte_exact() -> None:
    with S.FakeSwitch(rude_rejection=True) as switch:
        assert replay_inbound("in-rude-rejection", switch) == T.load("in-rude-rejection").stream(T.FS)


@contextmanager
def client(switch: S.FakeSwitch, *commands: str) -> Iterator[Peer]:
    sock = gevent.socket.create_connection(switch.address, timeout=WAIT)
    peer = Peer(sock)
    try:
        assert peer.until(lambda m: True).content_type == "auth/request"
        peer.send(command(f"auth {switch.password}"))
        assert peer.reply().reply_text == "+OK accepted"
        for line in commands:
            peer.send(command(line))
            peer.reply()
        yield peer
    finally:
        sock.close()


def api(peer: Peer, line: str) -> str:
    peer.send(command(f"api {line}"))
    return peer.until(lambda m: m.content_type == "api/response").text


def _captured_regs() -> list[S.Registration]:
    bodies = {m.command: None for m in T.load("in-api-registrations").messages(T.APP)}
    assert bodies
    xml = next(m.text for m in T.load("in-api-registrations").messages(T.FS) if m.text.startswith("<?xml"))
    regs = []
    for row in ET.fromstring(xml).iter("registration"):
        user, realm = row.findtext("user").split("@")
        regs.append(S.Registration(user, realm, network_ip=row.findtext("network-ip"),
                                   network_port=int(row.findtext("network-port")),
                                   call_id=row.findtext("call-id"), user_agent=row.findtext("agent")))
    regs.append(S.Registration("1003", "tenant-a.test", network_ip="::1", network_port=5077, profile="internal-ipv6",
                               call_id="api-1003-tenant-a-v6@[::1]", user_agent="Linphone/5.2.5 (belle-sip/5.2.5)"))
    return regs


def _norm_exp(text: str) -> str:
    return re.sub(r"(?i)exp\([^)]*\) expsecs\(\d+\)", "EXP", text)


def test_api_registrations_over_the_socket() -> None:
    t = T.load("in-api-registrations")
    commands = [m.command[4:] for m in t.messages(T.APP) if m.command.startswith("api ")]
    bodies = [m.text for m in t.messages(T.FS) if m.content_type == "api/response"]
    expected = dict(zip(commands, bodies))  # later (post-flush) answers win: checked below
    with S.FakeSwitch() as switch:
        for reg in _captured_regs():
            switch.add(reg)
        with client(switch) as peer:
            for line in ("sofia xmlstatus profile internal reg", "sofia xmlstatus profile internal-ipv6 reg",
                         "sofia status profile internal reg"):
                first = bodies[commands.index(line)]
                assert _norm_exp(api(peer, line)) == _norm_exp(first)
            user = "sofia xmlstatus profile internal user 1001@tenant-a.test"
            assert _norm_exp(api(peer, user)) == _norm_exp(bodies[commands.index(user)])
            assert api(peer, "sofia xmlstatus profile nosuch reg") == "Invalid Profile!\n"
            assert api(peer, "nosuchcommand") == "-ERR nosuchcommand Command not found!\n"
            assert api(peer, "sofia profile internal flush_inbound_reg") == "+OK flushing all registrations\n"
            assert api(peer, "sofia xmlstatus profile internal reg") == expected["sofia xmlstatus profile internal reg"]
            assert api(peer, user) == expected[user]  # the captured 102-byte empty document
            profiles = api(peer, "sofia xmlstatus")
            names = [p.findtext("name") for p in ET.fromstring(profiles).iter("profile")]
            assert names == ["internal", "internal-ipv6"]
            status = api(peer, "sofia status")
            assert "internal\tprofile\t" in status and status.endswith("2 profiles 0 aliases\n")
        assert switch.api_commands[0] == "sofia xmlstatus profile internal reg"
        assert [r.profile for r in switch.registrations] == ["internal-ipv6"]


def test_hostile_call_id_makes_malformed_xml() -> None:
    with S.FakeSwitch() as switch:
        switch.add(S.Registration("1003", "tenant-a.test", network_ip="127.0.0.16", network_port=5078,
                                  call_id="x<y>\"z\"'q'@127.0.0.16", user_agent="Téléphone ☎ 1.0 <b>&amp;</b>"))
        with client(switch) as peer:
            body = api(peer, "sofia xmlstatus profile internal user 1003@tenant-a.test")
    assert "<call-id>x<y>\"z\"'q'@127.0.0.16</call-id>" in body
    assert "<agent>Téléphone ☎ 1.0 &lt;b&gt;&amp;amp;&lt;/b&gt;</agent>" in body
    with pytest.raises(ET.ParseError):
        ET.fromstring(body)


def _norm_event(body: bytes) -> bytes:
    body = re.sub(rb"(Event-Date-[A-Za-z]+|Event-Sequence): [^\n]*", rb"\1: X", body)
    return re.sub(rb'"(Event-Date-[A-Za-z]+|Event-Sequence)":"[^"]*"', rb'"\1":"X"', body)


@pytest.mark.parametrize("fmt", ["plain", "json"])
def test_register_events_equal_the_capture(fmt: str) -> None:
    name = f"in-events-{fmt}"
    captured_events = {}
    for message in T.load(name).messages(T.FS):
        event = message.event()
        if event and event.subclass not in captured_events:
            captured_events[event.subclass] = (event, message.body)
    reg_event = captured_events["sofia::register"][0]
    reg = S.Registration(
        reg_event.get("username"), reg_event.get("realm"), network_ip=reg_event.get("network-ip"),
        network_port=int(reg_event.get("network-port")), call_id=reg_event.get("call-id"),
        user_agent=reg_event.get("user-agent"), registered_at=time.time(),
    )
    with S.FakeSwitch() as switch, client(switch, f"event {fmt} CUSTOM sofia::register sofia::expire "
                                                  "sofia::pre_register sofia::register_attempt") as peer:
        switch.add(reg, event=True)
        got = peer.event("sofia::register")
        assert _norm_event(got.body) == _norm_event(captured_events["sofia::register"][1])
        switch.emit_register(reg, attempts=True)
        for kind in ("sofia::pre_register", "sofia::register_attempt"):
            assert _norm_event(peer.event(kind).body) == _norm_event(captured_events[kind][1])
        switch.emit_expire(reg)
        expire = peer.event("sofia::expire").event()
        assert expire.get("user") == "1001" and expire.get("host") == "tenant-a.test"
        assert int(expire.get("expires")) == int(reg.registered_at) + 3600 + 10


@pytest.mark.parametrize("fmt", ["plain", "json"])
def test_events_parse_back_to_the_given_fields(fmt: str) -> None:
    reg = S.Registration("1002", "tenant-a.test", network_ip="2001:db8::7", network_port=5099,
                         call_id="dev-1@[2001:db8::7]", user_agent='Phone "X" & <y>', profile="internal-ipv6")
    with S.FakeSwitch() as switch, client(switch, f"event {fmt} CUSTOM sofia::register sofia::unregister "
                                                  "sofia::expire sofia::register_failure") as peer:
        switch.add(reg, event=True)
        switch.add(reg, event=True)  # same Call-ID: a refresh
        switch.emit_unregister(reg)
        switch.emit_unregister(reg, socket_close=True)
        switch.emit_expire(reg)
        switch.emit_register_failure(reg, registration_type="INVITE", to_user="9196")
        events = [peer.until(lambda m: m.event() is not None).event() for _ in range(6)]
    first, refresh, unreg, unreg_close, expire, failure = events
    for event in (first, refresh, unreg, expire):
        assert event.get("network-ip") == "2001:db8::7" and event.get("network-port") == "5099"
        assert event.get("call-id") == "dev-1@[2001:db8::7]" and event.get("user-agent") == 'Phone "X" & <y>'
        assert event.get("contact") == '"" <sip:1002@[2001:db8::7]:5099;transport=UDP>'
    assert first.get("presence-hosts") == "n/a" and first.get("profile-name") == "internal-ipv6"
    assert first.get("update-reg") is None and refresh.get("update-reg") == "true"
    assert first.get("sip_auth_username") == "1002" and first.get("domain_name") == "tenant-a.test"
    assert unreg.get("expires") == "0" and unreg.get("username") == "1002"
    assert unreg_close.get("reason") == "socket-disconnection" and unreg_close.get("network-ip") is None
    assert expire.get("user") == "1002" and expire.get("host") == "tenant-a.test"
    assert failure.get("to-user") == "9196" and failure.get("registration-type") == "INVITE"
    assert all(e.subclass.startswith("sofia::") and e.name == "CUSTOM" for e in events)


def test_unsubscribed_and_filtered_connections_get_nothing() -> None:
    reg = S.Registration("1001", "tenant-a.test", network_ip="127.0.0.10")
    with S.FakeSwitch() as switch, client(switch, "event plain CUSTOM sofia::expire") as only_expire, \
            client(switch, "event plain ALL", "filter call-id nope") as filtered:
        switch.emit_register(reg)
        switch.emit_expire(reg)
        assert only_expire.event("sofia::expire")
        assert [n for n, _ in switch.events_sent] == ["sofia::expire"]
        with pytest.raises(gevent.Timeout):
            filtered.until(lambda m: True, timeout=0.2)


def test_shutdown_sequence_and_restart() -> None:
    reg = S.Registration("1001", "tenant-a.test", network_ip="127.0.0.10")
    switch = S.FakeSwitch().start()
    try:
        switch.add(reg)
        with client(switch, "event plain SHUTDOWN CUSTOM sofia::register") as peer:
            switch.shutdown()
            shutdown = peer.event("SHUTDOWN").event()
            assert shutdown.get("Event-Info") == "System Shutting Down"
            assert peer.raws[-1] == T.disconnect_notice(None, T.SHUTTING_DOWN)
            peer.wait_eof()
        with pytest.raises(ConnectionRefusedError):
            gevent.socket.create_connection(switch.address, timeout=WAIT)
        switch.start()
        with client(switch) as peer:  # registrations survive the restart (captured)
            assert "127.0.0.10" in api(peer, "sofia xmlstatus profile internal reg")
    finally:
        switch.stop()


def test_faults_delay_reply_silent_and_drop() -> None:
    with S.FakeSwitch(api_delay=0.2, api_reply=b"\x00garbage<") as switch, client(switch) as peer:
        start = time.monotonic()
        assert api(peer, "sofia xmlstatus profile internal reg") == "\x00garbage<"
        assert time.monotonic() - start >= 0.2
    with S.FakeSwitch(accept_but_silent=True) as switch:
        sock = gevent.socket.create_connection(switch.address, timeout=WAIT)
        assert switch.wait_until(lambda: switch.connections == 1, WAIT)
        sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            sock.recv(10)
        switch.drop()
        sock.settimeout(WAIT)
        assert sock.recv(10) == b""
        sock.close()


def test_bgapi_background_job() -> None:
    with S.FakeSwitch() as switch:
        switch.add(S.Registration("1001", "tenant-a.test", network_ip="127.0.0.10"))
        with client(switch, "event json BACKGROUND_JOB") as peer:
            peer.send(command("bgapi sofia xmlstatus profile internal reg"))
            reply = peer.reply()
            job = reply.headers["Job-UUID"]
            assert reply.reply_text == f"+OK Job-UUID: {job}"
            event = peer.event("BACKGROUND_JOB").event()
    assert event.get("Job-UUID") == job and event.get("Job-Command") == "sofia"
    assert event.get("Job-Command-Arg") == "xmlstatus profile internal reg"
    assert "<network-ip>127.0.0.10</network-ip>" in event.body


def test_wait_subscribed() -> None:
    release = gevent.event.Event()

    def subscriber(switch: S.FakeSwitch) -> None:
        with client(switch, "event plain HEARTBEAT"):
            release.wait(WAIT)

    with S.FakeSwitch() as switch:
        assert not switch.wait_subscribed(1, timeout=0.05)
        greenlet = gevent.spawn(subscriber, switch)
        assert switch.wait_subscribed(1, timeout=WAIT)
        release.set()
        greenlet.get(timeout=WAIT)
        assert switch.wait_until(lambda: switch.subscribers == 0, WAIT)
    assert switch.connections == 1
