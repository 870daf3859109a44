"""fsguard against a real FreeSWITCH, end to end: SIP calls in, verdicts out.

Set-up (docker/README.rst): a FreeSWITCH configured as ``docker/freeswitch/`` - the shipped
``freeswitch-conf/dialplan/00_fsguard.xml`` first in each tenant context, the captures' test bed
otherwise - on this host's loopback, then::

    FSGUARD_FREESWITCH_ESL=127.0.0.1:8021 .venv/bin/pytest -m freeswitch -ra tests/freeswitch

Skipped, with the reason in pytest's ``-ra`` summary, when ``FSGUARD_FREESWITCH_ESL`` is not
set, when sipp is not installed, or when that ESL address does not answer or refuses the
password (``FSGUARD_FREESWITCH_PASSWORD``, default ``ClueCon``).  A test bed that answers but
is not usable (profile ``internal`` not running, tenant contexts that do not start with the
fsguard include, 127.0.0.1:8084 taken, a source address that cannot be bound) is an error.
Optional: ``FSGUARD_FREESWITCH_SIP`` (default ``127.0.0.1:5060``, where sipp sends),
``FSGUARD_SIPP`` (the sipp binary).

What the module does
    1. Checks the test bed over ESL (above).
    2. Starts ``fsguard run`` as a subprocess: listen 127.0.0.1:8084 (the address of the
       include's ``socket`` action), one switch = ``FSGUARD_FREESWITCH_ESL``, registrations
       from the cache, audit to SQLite in a temporary directory (``fsguard db upgrade`` first);
       waits for its ``listening on`` and ``watcher live`` log lines.
    3. Registers the test devices with sipp (captured ``reg_tenant.xml``) and waits, with a
       bounded retry of ``sofia xmlstatus profile internal user U@D``, until FreeSWITCH lists
       each one (its Call-ID and IP).
    4. Places the calls of the tests with sipp (captured ``inv_tenant.xml``,
       ``inv_tenant_cancel.xml``).  Call-IDs, From-tags and CSeqs are new at every run
       (fixtures README: a re-used Call-ID/From-tag/CSeq gets ``482 Request merged``).
    5. Unregisters every device it registered (``Expires: 0``, same Call-ID), waits until
       FreeSWITCH lists none of them, stops fsguard (SIGTERM) and checks it exited 0.

How each assertion is made
    answered             sipp exits 0 and the last final response (>= 200, not a 401/407
                         challenge) to the INVITE in sipp's ``-trace_msg`` file is ``200 OK``;
                         the scenario then ACKs, holds ``-d`` ms, sends BYE and requires its 200.
    603 Decline          sipp exits 0 (the scenario accepts any final response and ACKs it) and
                         that last final response is ``603 Decline``.
    487                  ``inv_tenant_cancel.xml`` requires a 487 to the INVITE (sipp exits 0)
                         and the trace shows it as the last final response.
    fsguard's log says   fsguard's stderr is read line by line; a call's line is the
                         ``decision`` line (``key=value`` pairs) with its identity=, source= and
                         destination=, logged after the call started; waited for up to 10 s.
    fsguard saw nothing  after the call, a marker call that fsguard must decide (1001@tenant-a
                         from its registered IP) is placed; once the marker's decision line is
                         there, no other ``decision`` or ``call-failed`` line may have been logged
                         since the call started.  fsguard logs a call when its socket closes,
                         before FreeSWITCH can answer it, so a call that had reached fsguard
                         would be logged before the marker.
    quickly / ~25 s      wall-clock time of the sipp run, first INVITE to final response.
Every sipp run leaves NAME.msg (messages), NAME.err (unexpected messages, if any) and NAME.out
(sipp's screen) and fsguard leaves fsguard*.log in one temporary directory, named in every
failure message.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import pytest

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = REPO / "fsguard" / "testing" / "fixtures" / "freeswitch" / "sipp"

ESL_ENV = "FSGUARD_FREESWITCH_ESL"
PASSWORD_ENV = "FSGUARD_FREESWITCH_PASSWORD"
SIP_ENV = "FSGUARD_FREESWITCH_SIP"
SIPP_ENV = "FSGUARD_SIPP"

GUARD_HOST, GUARD_PORT = "127.0.0.1", 8084  # the socket action of freeswitch-conf/dialplan/00_fsguard.xml
SIP_PASSWORD = "Test1234!"  # every test user's password (docker/freeswitch/vars.xml)
TENANTS = ("tenant-a.test", "tenant-b.test")
REGISTER_EXPIRES = 600  # seconds; every registration is removed at the end anyway
FAST = 5.0  # "at once": first INVITE to final answer, 407 round trip included
SILENT_GIVE_UP = (20.0, 35.0)  # FreeSWITCH waits ~25 s for an app's first command (captured 24.1 s)

RUN = f"{int(time.time())}-{os.getpid()}"  # in every Call-ID and From-tag of this run
_cseq = itertools.count(int(time.time()) % 1_000_000_000)  # time-based, as the captures' drivers did
_seq = itertools.count(1)


@dataclass(frozen=True)
class Device:
    """A phone: registers user@domain from ip:port; calls from ip:port+100."""

    user: str
    domain: str
    ip: str
    port: int
    user_agent: str

    @property
    def identity(self) -> str:
        return f"{self.user}@{self.domain}"

    @property
    def label(self) -> str:
        return f"{self.user}-{self.domain.split('.')[0]}-{self.ip.rsplit('.', 1)[1]}"

    @property
    def call_id(self) -> str:
        return f"fsguard-it-{RUN}-reg-{self.label}@{self.ip}"

    @property
    def from_tag(self) -> str:
        return f"fsguard-it-{RUN}-{self.label}"

    @property
    def call_port(self) -> int:
        # Not the registered port: nothing FreeSWITCH sends to the registered contact can
        # reach a sipp that is placing a call.
        return self.port + 100


# The captures' devices (fixtures README, "Devices / IPs used").
A1001 = Device("1001", "tenant-a.test", "127.0.0.10", 5070, 'Yealink SIP-T46S 66.86.0.15 "quoted" & <x>')
B1001 = Device("1001", "tenant-b.test", "127.0.0.11", 5071, "Grandstream GXP2170 1.0.11.23")
A1002_1 = Device("1002", "tenant-a.test", "127.0.0.12", 5072, "Yealink SIP-T54W 96.86.0.100")
A1002_2 = Device("1002", "tenant-a.test", "127.0.0.13", 5073, "PolycomVVX-VVX_450-UA/6.4.3.5018")
# Registered by the race test only, from an address nothing else uses.
A1003_RACE = Device("1003", "tenant-a.test", "127.0.0.14", 5074, "SIPp race device")
DEVICES = (A1001, B1001, A1002_1, A1002_2)
ATTACKER = ("127.0.0.20", 5080)  # knows 1001@tenant-a.test's password, never registered
TRUNK = ("127.0.0.30", 5060)  # ACL "providers": no credentials asked


def _media_port(sip_port: int) -> int:
    return sip_port + 1000


def _addresses_used() -> list[tuple[str, int]]:
    """Every local UDP address a sipp of this module binds (SIP and RTP)."""
    sip = [(d.ip, d.port) for d in (*DEVICES, A1003_RACE)]
    sip += [(d.ip, d.call_port) for d in (*DEVICES, A1003_RACE)] + [ATTACKER, TRUNK]
    calls = [(d.ip, d.call_port) for d in (*DEVICES, A1003_RACE)] + [ATTACKER, TRUNK]
    return sip + [(ip, _media_port(port)) for ip, port in calls]


# --------------------------------------------------------------------------------------------
# ESL inbound: just what the checks need (auth, api).


class EslError(Exception):
    """The event socket answered something unexpected, or closed."""


class EslAuthRefused(EslError):
    pass


class EslRejected(EslError):
    pass


class Esl:
    def __init__(self, host: str, port: int, password: str, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.file = self.sock.makefile("rb")
        try:
            headers, body = self._read()
            kind = headers.get("Content-Type")
            if kind == "text/rude-rejection":
                raise EslRejected(f"the event socket's ACL rejected this client ({body.strip()!r}: "
                                  f"event_socket.conf.xml apply-inbound-acl)")
            if kind != "auth/request":
                raise EslError(f"unexpected greeting {kind!r}")
            self._send(f"auth {password}")
            headers, _ = self._read()
            reply = headers.get("Reply-Text", "")
            if not reply.startswith("+OK"):
                raise EslAuthRefused(f"auth refused: {reply or headers!r}")
        except BaseException:
            self.close()
            raise

    def _send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\n\n")

    def _read(self) -> tuple[dict[str, str], str]:
        headers: dict[str, str] = {}
        while True:
            raw = self.file.readline()
            if not raw:
                raise EslError("FreeSWITCH closed the event socket connection")
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if not line:
                if headers:
                    break
                continue
            name, _, value = line.partition(":")
            headers[name.strip()] = value.strip()
        length = int(headers.get("Content-Length") or 0)
        body = self.file.read(length) if length else b""
        if len(body) < length:
            raise EslError("FreeSWITCH closed the event socket connection mid-message")
        return headers, body.decode("utf-8", "replace")

    def api(self, command: str) -> str:
        self._send(f"api {command}")
        while True:  # nothing is subscribed: the next api/response is ours
            headers, body = self._read()
            if headers.get("Content-Type") == "api/response":
                return body

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# sipp: command lines as in the captures' meta.sipp_commands, results from -trace_msg.

_TRACE_BLOCK = re.compile(r"^-{10,} \d{4}-\d\d-\d\d [\d:.]+\n", re.MULTILINE)
_TRACE_HEAD = re.compile(r"^(?:UDP|TCP|TLS|SCTP) message (sent|received)")


@dataclass
class SipMessage:
    direction: str  # "sent" | "received"
    text: str

    @property
    def first_line(self) -> str:
        return self.text.split("\n", 1)[0].strip()

    def header(self, name: str) -> str | None:
        match = re.search(rf"^{re.escape(name)}:[ \t]*(.*)$", self.text, re.MULTILINE | re.IGNORECASE)
        return match.group(1).strip() if match else None

    @property
    def status(self) -> int | None:
        match = re.match(r"SIP/2\.0 (\d{3})\b", self.first_line)
        return int(match.group(1)) if match else None

    @property
    def cseq_method(self) -> str:
        words = (self.header("CSeq") or "").split()
        return words[-1].upper() if words else ""


def parse_trace(path: Path) -> list[SipMessage]:
    """The messages of a sipp ``-trace_msg`` file, in order."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    messages = []
    for block in _TRACE_BLOCK.split(text)[1:]:
        head, _, rest = block.partition("\n")
        match = _TRACE_HEAD.match(head)
        if match:
            messages.append(SipMessage(match.group(1), rest.strip("\n")))
    return messages


@dataclass
class SippRun:
    name: str
    command: list[str]
    returncode: int
    elapsed: float
    base: Path  # NAME without extension; NAME.msg, NAME.err, NAME.out
    messages: list[SipMessage] = field(default_factory=list)

    def final(self, method: str = "INVITE") -> SipMessage | None:
        """The last final response to ``method`` (challenges 401/407 are not final answers)."""
        finals = [m for m in self.messages if m.direction == "received" and (m.status or 0) >= 200
                  and m.status not in (401, 407) and m.cseq_method == method]
        return finals[-1] if finals else None

    def final_text(self, method: str = "INVITE") -> str | None:
        final = self.final(method)
        return final.first_line.removeprefix("SIP/2.0 ") if final else None

    def describe(self) -> str:
        flow = "\n".join(f"    {'-->' if m.direction == 'sent' else '<--'} {m.first_line}  "
                         f"[CSeq: {m.header('CSeq')}]" for m in self.messages) or "    (no message traced)"
        errors = Path(f"{self.base}.err")
        err = errors.read_text(errors="replace")[-3000:] if errors.exists() else "(none)"
        return (f"sipp {self.name}: exit code {self.returncode}, {self.elapsed:.2f} s\n"
                f"  command: {shlex.join(self.command)}\n  SIP flow:\n{flow}\n"
                f"  unexpected messages ({errors}): {err}\n  files: {self.base}.msg/.err/.out")


@dataclass
class Bed:
    """The test bed: where FreeSWITCH answers, sipp, the run's directory."""

    esl_host: str
    esl_port: int
    password: str
    sip_target: str
    sipp: str
    workdir: Path
    registered: list[Device] = field(default_factory=list)

    def esl(self) -> Esl:
        return Esl(self.esl_host, self.esl_port, self.password)

    def sipp_run(self, name: str, scenario: str, *, ip: str, port: int, service: str,
                 variables: dict[str, str], call_id: str, auth_user: str | None = None,
                 auth_uri: str | None = None, hold_ms: int | None = None, media_port: int | None = None,
                 timeout: int = 12) -> SippRun:
        base = self.workdir / f"{next(_seq):03d}-{name}"
        command = [self.sipp, self.sip_target, "-i", ip, "-p", str(port)]
        if media_port is not None:
            command += ["-mp", str(media_port)]
        command += ["-sf", str(SCENARIOS / scenario), "-s", service]
        if auth_user is not None:
            command += ["-au", auth_user, "-ap", SIP_PASSWORD, "-auth_uri", auth_uri or ""]
        for key, value in variables.items():
            command += ["-set", key, value]
        if hold_ms is not None:
            command += ["-d", str(hold_ms)]
        command += ["-cid_str", call_id, "-m", "1", "-nostdin", "-timeout", f"{timeout}s", "-timeout_error",
                    "-trace_msg", "-message_file", f"{base}.msg", "-trace_err", "-error_file", f"{base}.err"]
        started = time.monotonic()
        with open(f"{base}.out", "wb") as screen:
            process = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=screen, stderr=subprocess.STDOUT,
                                     cwd=self.workdir, timeout=timeout + 30, check=False)
        elapsed = time.monotonic() - started
        return SippRun(name, command, process.returncode, elapsed, base, parse_trace(Path(f"{base}.msg")))

    def register(self, device: Device, expires: int) -> SippRun:
        run = self.sipp_run(
            f"register-{device.label}-expires{expires}", "reg_tenant.xml",
            ip=device.ip, port=device.port, service=device.user,
            auth_user=device.user, auth_uri=device.domain,
            variables={"dom": device.domain, "expires": str(expires), "ua": device.user_agent,
                       "ftag": device.from_tag, "cs1": str(next(_cseq)), "cs2": str(next(_cseq))},
            call_id=device.call_id, timeout=15,
        )
        # reg_tenant.xml also ends "successfully" on 403 (wrong password): check the answer.
        assert run.returncode == 0 and run.final_text("REGISTER") == "200 OK", (
            f"REGISTER {device.identity} from {device.ip} (Expires: {expires}) did not get 200 OK\n{run.describe()}")
        return run

    def wait_listed(self, device: Device, present: bool = True, timeout: float = 10.0) -> None:
        """Bounded retry on ``sofia xmlstatus``: FreeSWITCH writes a registration to its database
        around the time it answers 200 OK."""
        deadline = time.monotonic() + timeout
        with self.esl() as esl:
            while True:
                body = esl.api(f"sofia xmlstatus profile internal user {device.identity}")
                # <call-id> is emitted raw (fixtures README item 9); ours are plain text.
                listed = (f"<call-id>{device.call_id}</call-id>" in body
                          and f"<network-ip>{device.ip}</network-ip>" in body)
                if listed == present:
                    return
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"FreeSWITCH {'does not list' if present else 'still lists'} {device.identity} from "
                        f"{device.ip} (Call-ID {device.call_id}) after {timeout:g} s; sofia xmlstatus says:\n{body}")
                time.sleep(0.1)

    def call(self, name: str, *, caller: Device | None, source: tuple[str, int], destination: str,
             scenario: str = "inv_tenant.xml", hold_ms: int = 500, timeout: int = 12) -> SippRun:
        """An INVITE from ``source``; with ``caller``'s credentials, or none (the trunk)."""
        ip, port = source
        if caller is not None:
            variables = {"dom": caller.domain, "fdom": caller.domain, "user": caller.user, "ua": "SIPp fsguard-test"}
            auth = {"auth_user": caller.user, "auth_uri": f"{destination}@{caller.domain}"}
        else:  # as out-no-credentials-trunk
            variables = {"dom": "127.0.0.1", "fdom": "trunk.example", "user": "+447700900123", "ua": "Carrier SBC 1.0"}
            auth = {}
        return self.sipp_run(
            name, scenario, ip=ip, port=port, service=destination, variables=variables,
            call_id=f"fsguard-it-{RUN}-{name}-%u-%p@%s", media_port=_media_port(port),
            hold_ms=hold_ms if scenario == "inv_tenant.xml" else None, timeout=timeout, **auth,
        )


# --------------------------------------------------------------------------------------------
# fsguard as a process, its stderr read line by line.

_KEY_VALUE = re.compile(r"(\w+)=('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|\S*)")
_DECISION = re.compile(r"\bdecision (uuid=.*)$")


def parse_decision(line: str) -> dict[str, str] | None:
    match = _DECISION.search(line)
    return dict(_KEY_VALUE.findall(match.group(1))) if match else None


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


def _known_settings() -> set[tuple[str, str]]:
    from fsguard.config import SETTINGS

    return {(s.section, s.name) for s in SETTINGS}


def fsguard_config(workdir: Path, name: str, esl: tuple[str, int], password: str, **guard: object) -> str:
    host, port = esl
    guard = {"listen": f"{GUARD_HOST}:{GUARD_PORT}", "mode": "enforce", "on_error": "deny",
             "log_level": "info", **guard}
    known = _known_settings()
    if ("guard", "control_socket") in known:  # not under /run: the tests need no root
        guard.setdefault("control_socket", str(workdir / f"{name}.sock"))
    if ("guard", "metrics_listen") in known:  # off: nothing else of the host is touched
        guard.setdefault("metrics_listen", "")
    esl_address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = ["[guard]", *(f"{key} = {_toml(value)}" for key, value in guard.items()),
             "", "[[switch]]", 'name = "fs1"', f"esl = {_toml(esl_address)}", f"password = {_toml(password)}",
             "", "[audit]", f"url = {_toml(f'sqlite:///{workdir / name}.db')}", ""]
    return "\n".join(lines)


class Fsguard:
    def __init__(self, workdir: Path, name: str, config: str) -> None:
        self.name = name
        self.config_path = workdir / f"{name}.toml"
        self.config_path.write_text(config)
        self.log_path = workdir / f"{name}.log"
        self.lines: list[str] = []
        self.exit_codes: list[int] = []
        self.process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._changed = threading.Condition()

    def start(self, watcher: bool = True, timeout: float = 30.0) -> None:
        assert self.process is None, f"{self.name} is already running"
        upgrade = subprocess.run(
            [sys.executable, "-m", "fsguard", "db", "upgrade", "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False,
        )
        assert upgrade.returncode == 0, (
            f"fsguard db upgrade failed ({upgrade.returncode}):\n{upgrade.stdout}{upgrade.stderr}")
        since = self.mark()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fsguard", "run", "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, errors="replace", bufsize=1,
        )
        self._reader = threading.Thread(target=self._read, args=(self.process,), name=f"{self.name}-stderr",
                                        daemon=True)
        self._reader.start()
        self.wait_for(rf"\blistening on {re.escape(GUARD_HOST)}:{GUARD_PORT}\b", since, timeout)
        if watcher:  # its first snapshot of the switch's registrations is loaded
            self.wait_for(r"\bswitch=fs1 watcher live\b", since, timeout)

    def _read(self, process: subprocess.Popen) -> None:
        with open(self.log_path, "a", encoding="utf-8") as log:
            for line in process.stderr:
                log.write(line)
                log.flush()
                with self._changed:
                    self.lines.append(line.rstrip("\n"))
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def mark(self) -> int:
        with self._changed:
            return len(self.lines)

    def wait_for(self, wanted: str | Callable[[str], bool], since: int = 0, timeout: float = 10.0) -> int:
        """Index of the first line since ``since`` matching ``wanted`` (a regex or a predicate)."""
        test = (lambda line: re.search(wanted, line) is not None) if isinstance(wanted, str) else wanted
        deadline = time.monotonic() + timeout
        checked = since
        with self._changed:
            while True:
                for index in range(checked, len(self.lines)):
                    if test(self.lines[index]):
                        return index
                checked = len(self.lines)
                reader_done = self._reader is None or not self._reader.is_alive()
                if self.process is not None and self.process.poll() is not None and reader_done:
                    raise AssertionError(f"{self.name} exited with {self.process.returncode} while waiting for "
                                         f"{wanted!r}; its log ({self.log_path}):\n{self.tail()}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no line matching {wanted!r} in {self.name}'s log within {timeout:g} s "
                                         f"({self.log_path}); last lines:\n{self.tail()}")
                self._changed.wait(min(remaining, 0.5))

    def decisions(self, since: int, until: int | None = None) -> list[tuple[int, dict[str, str]]]:
        with self._changed:
            lines = list(enumerate(self.lines))[since:until]
        return [(index, d) for index, line in lines if (d := parse_decision(line)) is not None]

    def wait_decision(self, since: int, timeout: float = 10.0, **fields: str) -> tuple[int, dict[str, str]]:
        """The decision line of one call: the first since ``since`` with these key=value fields."""

        def matches(line: str) -> bool:
            decision = parse_decision(line)
            return decision is not None and all(decision.get(k) == v for k, v in fields.items())

        index = self.wait_for(matches, since, timeout)
        return index, parse_decision(self.lines[index]) or {}

    def lines_between(self, since: int, until: int | None = None) -> list[str]:
        with self._changed:
            return self.lines[since:until]

    def tail(self, count: int = 60) -> str:
        return "\n".join(self.lines[-count:]) or "(nothing logged)"

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait; the exit code (also of a process that already exited)."""
        if self.process is None:
            return self.exit_codes[-1] if self.exit_codes else 0
        process, self.process = self.process, None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
            self.exit_codes.append(code)
            raise AssertionError(f"{self.name} did not stop within {timeout:g} s of SIGTERM; killed") from None
        if self._reader is not None:
            self._reader.join(timeout=5)
        self.exit_codes.append(code)
        return code

    @contextlib.contextmanager
    def stopped(self) -> Iterator[None]:
        """fsguard not running for the duration (its address free), then running again."""
        code = self.stop()
        assert code == 0, f"{self.name} exited with {code} on SIGTERM:\n{self.tail()}"
        try:
            yield
        finally:
            self.start()


# --------------------------------------------------------------------------------------------
# A fake app on fsguard's address, for the dialplan's fail-closed modes.


class FakeApp:
    """Accepts FreeSWITCH's ``socket`` connections on 127.0.0.1:8084, then (behaviour):
    ``close``               closes at once, without a word (fsguard crashed before ``connect``);
    ``connect-then-close``  sends ``connect``, reads the channel data, closes (crash mid-call);
    ``silent``              holds the connection and never says anything (hung fsguard)."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.accepted = 0
        self.channel_data = b""
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((GUARD_HOST, GUARD_PORT))
        self._listener.listen(16)
        self._listener.settimeout(0.2)
        self._thread = threading.Thread(target=self._serve, name=f"fake-app-{behaviour}", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for sock in [self._listener, *self._held]:
            with contextlib.suppress(OSError):
                sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            if self.behaviour == "silent":
                self._held.append(conn)
                continue
            if self.behaviour == "connect-then-close":
                with contextlib.suppress(OSError):
                    conn.settimeout(5)
                    conn.sendall(b"connect\n\n")
                    data = b""
                    while b"\n\n" not in data:  # the reply is one header block, no body
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    self.channel_data = data
            conn.close()


# --------------------------------------------------------------------------------------------
# Fixtures.


def _parse_address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit():
        pytest.fail(f"{ESL_ENV}={value!r}: expected HOST:PORT, e.g. 127.0.0.1:8021", pytrace=False)
    return host, int(port)


def _first_extensions(esl: Esl, context: str) -> list[str] | None:
    """The extension names of a dialplan context, in order (None: cannot tell)."""
    body = esl.api(f"xml_locate dialplan context name {context}")
    if "<context" not in body:
        return None
    return re.findall(r"<extension\b[^>]*\bname=\"([^\"]*)\"", body)


def _check_bed(esl: Esl, esl_address: str) -> None:
    deadline = time.monotonic() + 30
    while not re.search(r"^\s*internal\s+profile\s+\S+\s+RUNNING", esl.api("sofia status"), re.MULTILINE):
        if time.monotonic() > deadline:
            pytest.fail(f"the FreeSWITCH at {esl_address} has no RUNNING sofia profile 'internal' after 30 s:\n"
                        f"{esl.api('sofia status')}", pytrace=False)
        time.sleep(0.5)
    for context in TENANTS:
        names = _first_extensions(esl, context)
        if names is None:
            print(f"note: could not read dialplan context {context} (xml_locate); not checked")
            continue
        if names[:2] != ["fsguard-verdict-check", "fsguard"]:
            pytest.fail(f"dialplan context {context} on {esl_address} does not start with the fsguard include "
                        f"(first extensions: {names[:4]}): not the docker/freeswitch test bed, or "
                        f"00_fsguard.xml not found (docker/README.rst)", pytrace=False)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((GUARD_HOST, GUARD_PORT))
        except OSError as exc:
            pytest.fail(f"{GUARD_HOST}:{GUARD_PORT} is taken ({exc.strerror}): the tests run their own fsguard "
                        f"there; stop the other one (docker compose --profile pair ... stop fsguard)", pytrace=False)
    for ip, port in _addresses_used():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((ip, port))
            except OSError as exc:
                pytest.fail(f"cannot bind UDP {ip}:{port} ({exc.strerror}), which a test sipp uses: every "
                            f"127.0.0.0/8 address must be local (Linux) and FreeSWITCH must listen on "
                            f"127.0.0.1 only (docker/freeswitch)", pytrace=False)


@pytest.fixture(scope="module", autouse=True)
def bed(tmp_path_factory: pytest.TempPathFactory) -> Bed:
    value = os.environ.get(ESL_ENV, "").strip()
    if not value:
        pytest.skip(f"{ESL_ENV} is not set: these tests need a real FreeSWITCH set up as in docker/README.rst "
                    f"and its event socket address, e.g. {ESL_ENV}=127.0.0.1:8021")
    host, port = _parse_address(value)
    sipp = os.environ.get(SIPP_ENV) or shutil.which("sipp")
    if os.environ.get(SIPP_ENV) and not os.access(sipp, os.X_OK):
        pytest.skip(f"sipp not found: {SIPP_ENV}={sipp!r} is not an executable")
    if not sipp:
        pytest.skip(f"sipp is not installed (Debian/Ubuntu: apt-get install sip-tester; or {SIPP_ENV}=/path/to/sipp)")
    password = os.environ.get(PASSWORD_ENV, "ClueCon")
    try:
        esl = Esl(host, port, password)
    except EslAuthRefused as exc:
        pytest.skip(f"FreeSWITCH ESL at {value}: {exc} (password from {PASSWORD_ENV}, default ClueCon)")
    except EslRejected as exc:
        pytest.skip(f"FreeSWITCH ESL at {value}: {exc}")
    except (OSError, EslError) as exc:
        pytest.skip(f"FreeSWITCH ESL at {value} is not reachable: {exc}")
    with esl:
        _check_bed(esl, value)
    return Bed(host, port, password, os.environ.get(SIP_ENV, "127.0.0.1:5060"), sipp,
               tmp_path_factory.mktemp("freeswitch"))


@pytest.fixture(scope="module")
def guard(bed: Bed) -> Iterator[Fsguard]:
    fsguard = Fsguard(bed.workdir, "fsguard",
                      fsguard_config(bed.workdir, "fsguard", (bed.esl_host, bed.esl_port), bed.password,
                                     registrations="cache"))
    fsguard.start()
    yield fsguard
    code = fsguard.stop()
    assert code == 0, f"fsguard exited with {code} on SIGTERM ({fsguard.log_path}):\n{fsguard.tail()}"


@pytest.fixture(scope="module")
def devices(bed: Bed, guard: Fsguard) -> Iterator[None]:
    """The captures' devices registered (after fsguard started: its cache follows the events)."""
    try:
        for device in DEVICES:
            bed.registered.append(device)  # before the REGISTER: a half-done one is removed too
            bed.register(device, REGISTER_EXPIRES)
        for device in DEVICES:
            bed.wait_listed(device)
        yield
    finally:
        failures = []
        for device in list(bed.registered):
            try:
                bed.register(device, 0)
                bed.wait_listed(device, present=False)
            except AssertionError as exc:
                failures.append(str(exc))
        bed.registered.clear()
        assert not failures, "unregistering the test devices failed:\n" + "\n".join(failures)


# --------------------------------------------------------------------------------------------
# Assertions.


def assert_answered(run: SippRun, guard: Fsguard) -> None:
    assert run.returncode == 0 and run.final_text() == "200 OK", (
        f"expected the call to be answered (200 OK)\n{run.describe()}\nfsguard's last lines:\n{guard.tail(20)}")


def assert_declined(run: SippRun, guard: Fsguard) -> None:
    assert run.returncode == 0 and run.final_text() == "603 Decline", (
        f"expected 603 Decline\n{run.describe()}\nfsguard's last lines:\n{guard.tail(20)}")


def assert_decision(guard: Fsguard, since: int, run: SippRun, *, verdict: str, reason: str,
                    **fields: str) -> dict[str, str]:
    try:
        _, decision = guard.wait_decision(since, **fields)
    except AssertionError as exc:
        raise AssertionError(f"fsguard logged no decision for {fields}\n{exc}\n{run.describe()}") from None
    assert (decision.get("verdict"), decision.get("reason")) == (verdict, reason), (
        f"fsguard decided {decision}, expected verdict={verdict} reason={reason}\n{run.describe()}")
    assert "error" not in decision, f"fsguard logged an error for the call: {decision}"
    return decision


def assert_fsguard_saw_nothing(bed: Bed, guard: Fsguard, since: int, what: str) -> None:
    marker = bed.call("marker", caller=A1001, source=(A1001.ip, A1001.call_port), destination="9196", hold_ms=0)
    assert_answered(marker, guard)
    index, _ = guard.wait_decision(since, identity=A1001.identity, source=A1001.ip, destination="9196")
    others = [decision for _, decision in guard.decisions(since, index)]
    failed = [line for line in guard.lines_between(since, index) if "call-failed" in line]
    assert not others and not failed, f"fsguard was asked about {what}: {others or failed}"


# --------------------------------------------------------------------------------------------
# The tests.

pytestmark = [pytest.mark.freeswitch, pytest.mark.usefixtures("devices")]


def test_call_from_the_registered_ip_is_answered(bed: Bed, guard: Fsguard) -> None:
    since = guard.mark()
    run = bed.call("registered-ip", caller=A1001, source=(A1001.ip, A1001.call_port), destination="9196")
    assert_answered(run, guard)
    decision = assert_decision(guard, since, run, verdict="allow", reason="registered-ip",
                               identity=A1001.identity, source=A1001.ip, destination="9196")
    assert decision.get("effective") == "yes", decision


def test_leaked_password_from_another_ip_gets_603(bed: Bed, guard: Fsguard) -> None:
    since = guard.mark()
    run = bed.call("leaked-password", caller=A1001, source=ATTACKER, destination="00442030001234")
    assert_declined(run, guard)
    decision = assert_decision(guard, since, run, verdict="deny", reason="ip-not-registered",
                               identity=A1001.identity, source=ATTACKER[0], destination="00442030001234")
    assert A1001.ip in decision.get("registered", "").split(","), decision
    assert decision.get("effective") == "yes", decision


def test_emergency_call_never_reaches_fsguard(bed: Bed, guard: Fsguard) -> None:
    since = guard.mark()
    run = bed.call("emergency-911", caller=A1001, source=ATTACKER, destination="911")
    assert_answered(run, guard)
    assert_fsguard_saw_nothing(bed, guard, since, "the 911 call")


def test_trunk_call_without_credentials_never_reaches_fsguard(bed: Bed, guard: Fsguard) -> None:
    since = guard.mark()
    run = bed.call("trunk-no-credentials", caller=None, source=TRUNK, destination="9196")
    assert_answered(run, guard)
    assert not any(m.header("Proxy-Authorization") for m in run.messages), "the trunk was challenged"
    assert_fsguard_saw_nothing(bed, guard, since, "the trunk's call")


def test_same_extension_of_another_tenant_from_this_ip_gets_603(bed: Bed, guard: Fsguard) -> None:
    # 1001@tenant-b.test is registered from .11; its credentials used from .10, where
    # 1001@tenant-a.test is registered: tenants share extension numbers, not devices.
    since = guard.mark()
    run = bed.call("tenant-b-collision", caller=B1001, source=(A1001.ip, A1001.call_port), destination="9196")
    assert_declined(run, guard)
    decision = assert_decision(guard, since, run, verdict="deny", reason="ip-not-registered",
                               identity=B1001.identity, source=A1001.ip, destination="9196")
    assert B1001.ip in decision.get("registered", "").split(","), decision


def test_second_device_of_a_multi_registration_is_answered(bed: Bed, guard: Fsguard) -> None:
    since = guard.mark()
    run = bed.call("multireg-second-device", caller=A1002_2, source=(A1002_2.ip, A1002_2.call_port),
                   destination="9196")
    assert_answered(run, guard)
    assert_decision(guard, since, run, verdict="allow", reason="registered-ip",
                    identity=A1002_2.identity, source=A1002_2.ip, destination="9196")


def test_call_right_after_registering_is_answered(bed: Bed, guard: Fsguard) -> None:
    # The race: sofia::register reaches fsguard 1-20 ms after the phone's 200 OK; the INVITE
    # follows the REGISTER at once (no wait on FreeSWITCH or fsguard in between).
    bed.registered.append(A1003_RACE)
    since = guard.mark()
    bed.register(A1003_RACE, REGISTER_EXPIRES)
    run = bed.call("register-then-call", caller=A1003_RACE, source=(A1003_RACE.ip, A1003_RACE.call_port),
                   destination="9196")
    assert_answered(run, guard)
    decision = assert_decision(guard, since, run, verdict="allow", reason="registered-ip",
                               identity=A1003_RACE.identity, source=A1003_RACE.ip, destination="9196")
    print(f"race: fsguard answered from lookup={decision.get('lookup')}")


def test_dialling_the_check_token_is_refused_without_fsguard(bed: Bed, guard: Fsguard) -> None:
    # docs/freeswitch-notes.md checklist item 9: the re-hunt token is refused, fsguard not asked.
    since = guard.mark()
    run = bed.call("check-token", caller=A1001, source=(A1001.ip, A1001.call_port),
                   destination="fsguard-verdict-check")
    assert_declined(run, guard)
    assert_fsguard_saw_nothing(bed, guard, since, "the call to fsguard-verdict-check")


def test_caller_cancel_while_fsguard_decides(bed: Bed, guard: Fsguard) -> None:
    # fsguard decides in milliseconds, before any CANCEL could arrive.  To hold it mid-decision,
    # this test runs a second fsguard whose (live) lookup goes to fsguard's own ESL simulator
    # answering 3 s late; everything between the caller and fsguard is the real switch.  The
    # caller cancels 1 s after its 100 Trying (inv_tenant_cancel.xml).
    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        pytest.skip("needs gevent's monkey patching (tests/conftest.py) for fsguard's ESL simulator")
    from fsguard.testing.switch import FakeSwitch, Registration

    with guard.stopped(), FakeSwitch(api_delay=3.0) as slow_switch:
        slow_switch.add(Registration(A1001.user, A1001.domain, network_ip=A1001.ip, network_port=A1001.port))
        slow = Fsguard(bed.workdir, "fsguard-slow-lookup",
                       fsguard_config(bed.workdir, "fsguard-slow-lookup", slow_switch.address, "ClueCon",
                                      registrations="live", decision_timeout=8.0, command_timeout=10.0))
        slow.start(watcher=False)
        try:
            since = slow.mark()
            run = bed.call("caller-cancels", caller=A1001, source=(A1001.ip, A1001.call_port), destination="9196",
                           scenario="inv_tenant_cancel.xml")
            assert run.returncode == 0 and run.final_text() == "487 Request Terminated", (
                f"expected 487 Request Terminated\n{run.describe()}\nslow fsguard's last lines:\n{slow.tail(20)}")
            _, decision = slow.wait_decision(since, timeout=15, identity=A1001.identity, source=A1001.ip,
                                             destination="9196")
            assert decision.get("caller_hung_up", decision.get("hung_up")) == "yes", decision
            assert "error" not in decision, decision
            trouble = [line for line in slow.lines_between(since)
                       if re.search(r"call-failed|handler failed|Traceback|\bERROR\b", line)]
            assert not trouble, "fsguard logged errors for the cancelled call:\n" + "\n".join(trouble)
        finally:
            code = slow.stop()
        assert code == 0, f"the slow fsguard exited with {code}:\n{slow.tail()}"


def test_fsguard_not_listening_refuses_at_once(bed: Bed, guard: Fsguard) -> None:
    with guard.stopped():
        with socket.socket() as probe:
            assert probe.connect_ex((GUARD_HOST, GUARD_PORT)) != 0, f"something still listens on {GUARD_PORT}"
        run = bed.call("fsguard-down", caller=A1001, source=(A1001.ip, A1001.call_port), destination="9196")
    assert_declined(run, guard)
    assert run.elapsed < FAST, f"603 took {run.elapsed:.1f} s\n{run.describe()}"


@pytest.mark.parametrize("behaviour", ["close", "connect-then-close"])
def test_app_closing_without_a_verdict_refuses_at_once(bed: Bed, guard: Fsguard, behaviour: str) -> None:
    # docs/freeswitch-notes.md checklist item 4 (sync mode: only derived from source so far).
    with guard.stopped(), FakeApp(behaviour) as app:
        run = bed.call(f"app-{behaviour}", caller=A1001, source=(A1001.ip, A1001.call_port), destination="9196")
    assert app.accepted >= 1, f"FreeSWITCH never connected to the fake app\n{run.describe()}"
    if behaviour == "connect-then-close":
        assert b"Channel-Unique-ID" in app.channel_data, f"no channel data for connect: {app.channel_data[:300]!r}"
    assert_declined(run, guard)
    assert run.elapsed < FAST, f"603 took {run.elapsed:.1f} s\n{run.describe()}"


@pytest.mark.stress
def test_silent_app_refuses_after_about_25_s(bed: Bed, guard: Fsguard) -> None:
    with guard.stopped(), FakeApp("silent") as app:
        run = bed.call("app-silent", caller=A1001, source=(A1001.ip, A1001.call_port), destination="9196",
                       timeout=45)
    assert app.accepted >= 1, f"FreeSWITCH never connected to the fake app\n{run.describe()}"
    assert_declined(run, guard)
    low, high = SILENT_GIVE_UP
    assert low <= run.elapsed <= high, f"603 after {run.elapsed:.1f} s, expected {low:g}-{high:g} s\n{run.describe()}"
