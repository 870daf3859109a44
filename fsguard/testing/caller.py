"""FreeSWITCH's outbound role: a call running the ``socket`` application.

The dialplan's ``socket <host:port> async full`` makes FreeSWITCH connect to
the app (fsguard).  :func:`place_call` plays that FreeSWITCH side against a
listening app, replaying the captured bytes of ``fixtures/freeswitch``
(README there) with the call's facts substituted, and records what the app
did and what the caller's phone would have got.

Public API
----------
``place_call(address, scenario=None, timeout=5.0) -> CallResult``
    Connect to ``address`` like FreeSWITCH does and simulate one call.
    Blocks the calling greenlet until the call is settled or ``timeout``.
``place_calls(address, scenarios, concurrency=10, timeout=5.0) -> list[CallResult]``
``CallScenario``  what call to simulate (substitutions, mode, timers, faults).
``CallResult``    what happened (commands, variables, outcome, sip_final, ...).
``SUBSTITUTIONS`` the fact -> headers table used to rewrite captured bytes.
``captured_facts(base) -> dict``  the facts of a captured call.
``channel_data(scenario) -> bytes``  the ``connect`` reply for a scenario.

Outcomes and what the caller's phone gets (``sip_final``)
---------------------------------------------------------
``"rejected"``  the channel was hung up: ``CALL_REJECTED`` -> ``"603 Decline"``
                (captured for ``respond 603`` and ``hangup CALL_REJECTED``);
                other causes per mod_sofia hangup_cause_to_sip (not captured);
                ``respond <code> <text>`` -> that code and text.
``"cancelled"`` the caller sent CANCEL: ``"487 Request Terminated"`` (captured).
``"continued"`` the socket application returned and the dialplan went on
                (``sip_final`` None: it depends on the rest of the dialplan).
``"stuck"``     the call is still inside the socket app (parked, CS_RESET,
                or the app still holds the socket) - no final answer.
``"aborted"``   only with a connection fault injected by the scenario.
If nothing listens at ``address``: outcome ``"continued"``, ``refused`` True
(captured: out-socket-target-down, FreeSWITCH fails open).
"""

from __future__ import annotations

import re
import time
import uuid as uuidlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache
from typing import Literal

import gevent
import gevent.event
import gevent.lock
import gevent.pool
import gevent.queue
import gevent.socket

from fsguard.esl.protocol import Message, ProtocolError, decode_value
from fsguard.testing import transcripts as tr
from fsguard.testing.transcripts import RawHeaders

ALLOW_BASE = "out-allow-registered-ip"
TRUNK_BASE = "out-no-credentials-trunk"
_RESPOND = "out-deny-respond-603"
_HANGUP = "out-deny-hangup-call-rejected"
_CANCEL = "out-caller-cancels"

# --------------------------------------------------------------------------
# Substitution table: which captured headers carry which fact of the call.
# Found by diffing the captures (tenant-b vs tenant-a, .13 vs .10, 911 vs
# 9196, trunk vs credentialed ...).  A fact's captured value is replaced,
# token-bounded, inside the decoded value, which is then re-encoded with
# switch_url_encode.  A header listed under several facts takes, for a given
# old token, the first fact in this order (auth identity before From user).
# The session uuid is additionally replaced wherever else it occurs.
SUBSTITUTIONS: dict[str, tuple[str, ...]] = {
    "uuid": (
        "Unique-ID", "Channel-Unique-ID", "Caller-Unique-ID", "Channel-Call-UUID",
        "variable_uuid", "variable_call_uuid", "Controlled-Session-UUID",
    ),
    "auth_user": (
        "variable_sip_auth_username", "variable_user_name", "variable_number_alias",
        "variable_sip_number_alias", "variable_requested_user_name",
        "variable_effective_caller_id_name", "variable_effective_caller_id_number",
        "variable_presence_id", "Channel-Presence-ID",
    ),
    "from_user": (
        "Channel-Username", "Caller-Username", "Channel-Caller-ID-Name", "Channel-Caller-ID-Number",
        "Channel-Orig-Caller-ID-Name", "Channel-Orig-Caller-ID-Number", "Channel-ANI",
        "Caller-Caller-ID-Name", "Caller-Caller-ID-Number", "Caller-Orig-Caller-ID-Name",
        "Caller-Orig-Caller-ID-Number", "Caller-ANI", "Channel-Name", "Channel-Channel-Name",
        "Caller-Channel-Name", "variable_channel_name", "variable_sip_from_user",
        "variable_sip_from_uri", "variable_sip_from_user_stripped", "variable_sip_from_display",
        "variable_sip_full_from", "variable_sip_contact_user", "variable_sip_contact_uri",
        "variable_caller_id", "variable_presence_id", "Channel-Presence-ID",
    ),
    "realm": (
        "Channel-Context", "Caller-Context", "Channel-Name", "Channel-Channel-Name",
        "Caller-Channel-Name", "variable_channel_name", "Channel-Presence-ID",
        "variable_presence_id", "variable_sip_from_uri", "variable_sip_from_host",
        "variable_sip_full_from", "variable_sip_auth_realm", "variable_requested_domain_name",
        "variable_domain_name", "variable_accountcode", "variable_user_context",
        "variable_sip_req_uri", "variable_sip_req_host", "variable_sip_to_uri",
        "variable_sip_to_host", "variable_sip_full_to", "variable_transfer_history",
        "variable_transfer_source", "Channel-Transfer-Source", "Caller-Transfer-Source",
    ),
    "source_ip": (
        "Channel-Network-Addr", "Caller-Network-Addr", "variable_sip_network_ip",
        "variable_sip_received_ip", "variable_sip_via_host", "variable_sip_contact_host",
        "variable_sip_contact_uri", "variable_sip_full_via", "variable_switch_r_sdp",
        "variable_sip_call_id",  # sipp's Call-IDs end in @<its IP>, as many phones' do
    ),
    "source_port": (
        "variable_sip_network_port", "variable_sip_received_port", "variable_sip_via_port",
        "variable_sip_contact_port", "variable_sip_contact_uri", "variable_sip_full_via",
    ),
    "destination": (
        "Channel-Destination-Number", "Caller-Destination-Number", "variable_sip_req_user",
        "variable_sip_req_uri", "variable_sip_to_user", "variable_sip_to_uri",
        "variable_sip_full_to", "Channel-RDNIS", "Caller-RDNIS", "variable_DP_MATCH",
        "variable_transfer_history", "variable_transfer_source", "Channel-Transfer-Source",
        "Caller-Transfer-Source",
    ),
    "user_agent": ("variable_sip_user_agent",),
}

# Where each fact's captured value is read from (first header present wins).
FACT_SOURCES: dict[str, tuple[str, ...]] = {
    "uuid": ("Unique-ID",),
    "auth_user": ("variable_sip_auth_username",),
    "realm": ("variable_sip_auth_realm", "variable_domain_name"),
    "from_user": ("variable_sip_from_user",),
    "source_ip": ("Caller-Network-Addr",),
    "source_port": ("variable_sip_network_port",),
    "destination": ("Caller-Destination-Number",),
    "user_agent": ("variable_sip_user_agent",),
}


def _bracket(ip: str) -> str:
    # Not captured for IPv6 callers: sofia-sip keeps hosts in URIs/Via bracketed.
    return f"[{ip}]" if ":" in ip else ip


def _sdp(ip: str) -> str:
    return f"IP{6 if ':' in ip else 4} {ip}"


# How a fact is written inside particular headers (default: as is).
_FORMS: dict[tuple[str, str], Callable[[str], str]] = {
    ("from_user", "variable_sip_from_user_stripped"): lambda user: user.removeprefix("+"),
    ("source_ip", "variable_switch_r_sdp"): _sdp,
    ("source_ip", "variable_sip_contact_uri"): _bracket,
    ("source_ip", "variable_sip_full_via"): _bracket,
    ("source_ip", "variable_sip_via_host"): _bracket,
    ("source_ip", "variable_sip_contact_host"): _bracket,
}

_HEADER_FACTS: dict[str, list[str]] = {}
for _fact, _headers in SUBSTITUTIONS.items():
    if _fact != "uuid":
        for _header in _headers:
            _HEADER_FACTS.setdefault(_header, []).append(_fact)

Mapping = dict[str, tuple[str, str]]  # fact -> (captured value, new value)


def _replace_tokens(value: str, pairs: list[tuple[str, str]]) -> str:
    table: dict[str, str] = {}
    for old, new in pairs:
        table.setdefault(old, new)
    alternatives = "|".join(re.escape(old) for old in sorted(table, key=len, reverse=True))
    # Token bounds keep 127.0.0.1 from matching inside 127.0.0.10, 1001 inside 10010.
    pattern = rf"(?<![\w.])(?:{alternatives})(?![\w.])"
    return re.sub(pattern, lambda m: table[m.group(0)], value)


def rewrite(name: str, raw: bytes, mapping: Mapping) -> bytes:
    """Apply the substitution table to one raw header value."""
    if "uuid" in mapping:
        old, new = mapping["uuid"]
        raw = raw.replace(old.encode(), new.encode())
    facts = [f for f in _HEADER_FACTS.get(name, ()) if f in mapping]
    if not facts:
        return raw
    value = decode_value(raw)
    form = lambda fact, v: _FORMS.get((fact, name), str)(v)  # noqa: E731
    changed = _replace_tokens(value, [(form(f, mapping[f][0]), form(f, mapping[f][1])) for f in facts])
    return raw if changed == value else tr.url_encode(changed).encode("ascii")


def _mapping(old: dict[str, str | None], new: dict[str, str | None]) -> Mapping:
    return {f: (o, n) for f in FACT_SOURCES if (o := old.get(f)) and (n := new.get(f)) and o != n}


# --------------------------------------------------------------------------
# Channel model: the ordered header list FreeSWITCH serialises.


class Channel:
    """The channel as the CHANNEL_DATA header list, values kept raw."""

    def __init__(self, headers: RawHeaders) -> None:
        self.headers: list[list] = [[n, v] for n, v in headers]
        self.dirty: set[str] = set()  # headers changed after connect

    @classmethod
    def from_channel_data(cls, raw: bytes) -> Channel:
        return cls(tr.parse_headers(raw.removesuffix(b"\n\n")))

    def _index(self, name: str) -> int:
        for i, (n, _) in enumerate(self.headers):
            if n == name:
                return i
        return -1

    def raw(self, name: str) -> bytes | None:
        i = self._index(name)
        return self.headers[i][1] if i >= 0 else None

    def get(self, name: str) -> str | None:
        raw = self.raw(name)
        return None if raw is None else decode_value(raw)

    def set(self, name: str, value: str | None, before: tuple[str, ...] = ("Content-Type",)) -> None:
        """Replace in place; a new header goes before the first ``before`` found."""
        i = self._index(name)
        if value is None:
            if i >= 0:
                del self.headers[i]
            return
        raw = tr.url_encode(value).encode("ascii")
        if i >= 0:
            self.headers[i][1] = raw
            return
        at = next((j for b in before if (j := self._index(b)) >= 0), len(self.headers))
        self.headers.insert(at, [name, raw])

    def set_var(self, var: str, value: str | None) -> None:
        """switch_channel_set_variable: delete, then append after the last variable."""
        name = f"variable_{var}"
        i = self._index(name)
        if i >= 0:
            del self.headers[i]
        self.dirty.add(name)
        if value is None:
            return
        last = max((j for j, (n, _) in enumerate(self.headers) if n.startswith("variable_")), default=-1)
        self.headers.insert(last + 1, [name, tr.url_encode(value).encode("ascii")])

    def rewrite(self, fn: Callable[[str, bytes], bytes]) -> None:
        for header in self.headers:
            header[1] = fn(header[0], header[1])

    def channel_data(self) -> bytes:
        return b"".join(n.encode() + b": " + v + b"\n" for n, v in self.headers) + b"\n"


@cache
def captured_facts(base: str) -> dict[str, str | None]:
    """The facts (see FACT_SOURCES) of a captured outbound call."""
    channel = Channel.from_channel_data(tr.load(base).channel_data)
    facts: dict[str, str | None] = {}
    for fact, sources in FACT_SOURCES.items():
        facts[fact] = next((v for s in sources if (v := channel.get(s)) is not None), None)
    return facts


# --------------------------------------------------------------------------
# Event templates: captured events re-rendered for the simulated call.


@dataclass(frozen=True)
class _Source:
    """What a template transcript's call looked like."""

    channel: dict[str, bytes]
    facts: dict[str, str | None]
    app_vars: frozenset[str]  # variables the capture's app set itself


@cache
def _source(name: str) -> _Source:
    t = tr.load(name)
    channel = dict(tr.parse_headers(t.channel_data.removesuffix(b"\n\n")))
    app_vars = set()
    for message in t.messages(tr.APP):
        if message.headers.get("execute-app-name") == "set":
            app_vars.add(message.headers.get("execute-app-arg", "").partition("=")[0])
    return _Source(channel, captured_facts(name), frozenset(app_vars))


@dataclass(frozen=True)
class _Item:
    """One step of a captured sequence: an event body, or the linger notice."""

    source: str
    headers: tuple[tuple[str, bytes], ...] = ()  # empty = linger notice

    @property
    def name(self) -> str:
        return next((decode_value(v) for n, v in self.headers if n == "Event-Name"), "")

    def value(self, header: str) -> str | None:
        return next((decode_value(v) for n, v in self.headers if n == header), None)


def _event_item(source: str, raw: bytes) -> _Item:
    body = raw.partition(b"\n\n")[2]
    return _Item(source, tuple(tr.parse_headers(body.partition(b"\n\n")[0])))


@cache
def _items(name: str) -> tuple[_Item, ...]:
    """Events and the linger notice of a capture, in captured order."""
    items = []
    for message, raw in tr.load(name).raw_messages(tr.FS):
        if message.content_type == "text/event-plain":
            items.append(_event_item(name, raw))
        elif message.headers.get("Content-Disposition") == "linger":
            items.append(_Item(name))
    return tuple(items)


@cache
def _sequence(name: str) -> tuple[_Item, ...]:
    # CHANNEL_PARK is racy (README): only sent on request (park_event).
    return tuple(item for item in _items(name) if item.name != "CHANNEL_PARK")


def _template(name: str, event: str, application: str | None = None) -> _Item:
    for item in _items(name):
        if item.name == event and application in (None, item.value("Application")):
            return item
    raise LookupError(f"{name}: no {event} {application or ''}")


# Q.850 code of a cause: the cause number itself up to 127, else 16
# (captured: ORIGINATOR_CANCEL -> 16, CALL_REJECTED -> 21).
_CAUSES = {
    "UNALLOCATED_NUMBER": 1, "NO_ROUTE_DESTINATION": 3, "NORMAL_CLEARING": 16, "USER_BUSY": 17,
    "NO_USER_RESPONSE": 18, "NO_ANSWER": 19, "SUBSCRIBER_ABSENT": 20, "CALL_REJECTED": 21,
    "NUMBER_CHANGED": 22, "DESTINATION_OUT_OF_ORDER": 27, "INVALID_NUMBER_FORMAT": 28,
    "FACILITY_REJECTED": 29, "NORMAL_UNSPECIFIED": 31, "NORMAL_TEMPORARY_FAILURE": 41,
    "SWITCH_CONGESTION": 42, "INCOMPATIBLE_DESTINATION": 88, "ORIGINATOR_CANCEL": 487,
}

# mod_sofia hangup_cause_to_sip (not captured except CALL_REJECTED -> 603).
_CAUSE_TO_SIP = {
    "UNALLOCATED_NUMBER": "404 Not Found", "NO_ROUTE_DESTINATION": "404 Not Found",
    "USER_BUSY": "486 Busy Here", "NO_USER_RESPONSE": "408 Request Timeout",
    "NO_ANSWER": "480 Temporarily Unavailable", "SUBSCRIBER_ABSENT": "480 Temporarily Unavailable",
    "CALL_REJECTED": "603 Decline", "NUMBER_CHANGED": "410 Gone",
    "DESTINATION_OUT_OF_ORDER": "502 Bad Gateway", "INVALID_NUMBER_FORMAT": "484 Address Incomplete",
    "FACILITY_REJECTED": "501 Not Implemented", "NORMAL_TEMPORARY_FAILURE": "503 Service Unavailable",
    "SWITCH_CONGESTION": "503 Service Unavailable", "INCOMPATIBLE_DESTINATION": "488 Not Acceptable Here",
    "ORIGINATOR_CANCEL": "487 Request Terminated",
}
_DEFAULT_SIP = "480 Temporarily Unavailable"

# sofia_glue_sip_cause_to_freeswitch, for ``respond <code>`` (captured: 603).
_SIP_TO_CAUSE = {
    401: "CALL_REJECTED", 402: "CALL_REJECTED", 403: "CALL_REJECTED", 407: "CALL_REJECTED",
    603: "CALL_REJECTED", 608: "CALL_REJECTED", 404: "UNALLOCATED_NUMBER",
    480: "NO_USER_RESPONSE", 486: "USER_BUSY", 600: "USER_BUSY", 484: "INVALID_NUMBER_FORMAT",
    487: "ORIGINATOR_CANCEL", 488: "INCOMPATIBLE_DESTINATION", 606: "INCOMPATIBLE_DESTINATION",
    400: "NORMAL_TEMPORARY_FAILURE", 500: "NORMAL_TEMPORARY_FAILURE", 503: "NORMAL_TEMPORARY_FAILURE",
}
_PHRASES = {int(s.split()[0]): s.partition(" ")[2] for s in _CAUSE_TO_SIP.values()} | {
    403: "Forbidden", 603: "Decline", 600: "Busy Everywhere", 606: "Not Acceptable",
}


def _q850(cause: str) -> str:
    code = _CAUSES.get(cause, 16)
    return str(code if code <= 127 else 16)


# Events a ``myevents`` listener is subscribed to (mod_event_socket).
_MYEVENTS = {
    "CHANNEL_ANSWER", "CHANNEL_APPLICATION", "CHANNEL_BRIDGE", "CHANNEL_CREATE", "CHANNEL_DATA",
    "CHANNEL_DESTROY", "CHANNEL_EXECUTE", "CHANNEL_EXECUTE_COMPLETE", "CHANNEL_HANGUP",
    "CHANNEL_HANGUP_COMPLETE", "CHANNEL_ORIGINATE", "CHANNEL_UUID", "CHANNEL_OUTGOING",
    "CHANNEL_PARK", "CHANNEL_PROGRESS", "CHANNEL_PROGRESS_MEDIA", "CHANNEL_STATE",
    "CHANNEL_UNBRIDGE", "CHANNEL_UNPARK", "DETECTED_SPEECH", "DTMF", "NOTALK", "TALK",
}

# --------------------------------------------------------------------------
# Scenario and result.

Fault = Literal["close_on_accept", "close_mid_channel_data", "no_connect_reply", "garbage_channel_data"]


@dataclass
class CallScenario:
    """One simulated call; unset facts keep the captured values.

    ``base`` defaults to ``out-allow-registered-ip`` (credentialed call) or
    ``out-no-credentials-trunk`` when ``credentials`` is False.  ``uuid``
    None keeps the captured session uuid (byte-exact replay).  ``extra`` sets
    (or with None removes) headers of the channel data by name, values
    decoded, e.g. ``{"variable_sip_h_X-AUTH-IP": "10.0.0.1"}``.
    Times are seconds: ``cancel_after`` counts from the TCP connection,
    ``park_timeout`` from the park (= the ``connect``, or the dead socket).
    """

    credentials: bool = True
    base: str | None = None
    auth_user: str | None = None
    realm: str | None = None
    source_ip: str | None = None
    source_port: int | None = None
    destination: str | None = None
    user_agent: str | None = None
    from_user: str | None = None
    uuid: str | None = field(default_factory=lambda: str(uuidlib.uuid4()))
    extra: dict[str, str | None] = field(default_factory=dict)
    socket_mode: Literal["async", "static"] = "async"
    frame_delay: float = 0.020  # async: sendmsg runs on the parked session's next 20 ms frame
    cancel_after: float | None = None
    park_timeout: float | None = None  # async only: ``set park_timeout=N:CALL_REJECTED``
    silent_timeout: float = 25.0  # FreeSWITCH waits this long for the first command
    park_event: bool = False  # deliver the (racy) CHANNEL_PARK after myevents
    # Faults (simulated FreeSWITCH misbehaving):
    fault: Fault | None = None
    garbage: bytes = b"\x00\xffHTTP/1.1 400 Bad Request\r\nX: \xfe\r\n\r\n"
    err_on: tuple[str, ...] = ()  # command prefixes answered with -ERR and not executed

    @property
    def base_name(self) -> str:
        return self.base or (ALLOW_BASE if self.credentials else TRUNK_BASE)


@dataclass
class CallResult:
    """What happened on one simulated call (times: time.monotonic())."""

    uuid: str
    outcome: str = "stuck"
    sip_final: str | None = None
    hangup_cause: str | None = None
    commands: list[bytes] = field(default_factory=list)  # exact bytes, one per command
    sent: list[bytes] = field(default_factory=list)  # exact bytes, one per message sent
    events: list[str] = field(default_factory=list)  # names of the events sent
    variables: dict[str, str | None] = field(default_factory=dict)  # set/export/unset/uuid_setvar
    connected_at: float | None = None
    verdict_at: float | None = None
    closed_by: str | None = None  # "app" | "switch"
    timed_out: bool = False
    refused: bool = False
    resumed: bool = False

    @property
    def verdict(self) -> str | None:
        return self.variables.get("fsguard_verdict")

    @property
    def command_lines(self) -> list[str]:
        return [c.split(b"\n", 1)[0].decode("utf-8", "replace") for c in self.commands]


def _resolve(scenario: CallScenario, old: dict[str, str | None]) -> dict[str, str | None]:
    if scenario.auth_user is not None and old["auth_user"] is None:
        raise ValueError(f"{scenario.base_name} has no credentials: auth_user cannot be set")
    new = dict(old)
    wanted = {
        "uuid": scenario.uuid, "auth_user": scenario.auth_user, "realm": scenario.realm,
        "source_ip": scenario.source_ip, "destination": scenario.destination,
        "user_agent": scenario.user_agent,
        "source_port": None if scenario.source_port is None else str(scenario.source_port),
        # Captured credentialed calls have From user == auth user.
        "from_user": scenario.from_user or (scenario.auth_user if old["auth_user"] else None),
    }
    new.update({k: v for k, v in wanted.items() if v is not None})
    return new


def _set_mode(channel: Channel, mode: str) -> None:
    if channel.get("Socket-Mode") == mode:
        return
    channel.set("Socket-Mode", mode)
    words = [w for w in (channel.get("variable_current_application_data") or "").split() if w != "async"]
    if mode == "async" and words:
        words.insert(1, "async")
    channel.set("variable_current_application_data", " ".join(words))


def build_channel(scenario: CallScenario) -> tuple[Channel, dict[str, str | None]]:
    """The scenario's channel (CHANNEL_DATA headers) and resolved facts."""
    base = scenario.base_name
    channel = Channel.from_channel_data(tr.load(base).channel_data)
    old = captured_facts(base)
    new = _resolve(scenario, old)
    mapping = _mapping(old, new)
    if mapping:
        channel.rewrite(lambda name, raw: rewrite(name, raw, mapping))
    _set_mode(channel, scenario.socket_mode)
    if scenario.park_timeout is not None and scenario.socket_mode == "async":
        # Captured (out-allow-park-timeout): set by the dialplan before socket.
        channel.set("variable_park_timeout", f"{scenario.park_timeout:g}:CALL_REJECTED",
                    before=("variable_current_application_data", "variable_current_application"))
    for name, value in scenario.extra.items():
        anchors = ("variable_current_application_data", "variable_current_application", "Content-Type")
        channel.set(name, value, before=anchors)
    return channel, new


def channel_data(scenario: CallScenario) -> bytes:
    """The exact ``connect`` reply the scenario's call sends."""
    return build_channel(scenario)[0].channel_data()


# --------------------------------------------------------------------------
# The simulated session.

Outputs = list[bytes]


class _Call:
    """One outbound ESL session, driven by the app's commands and timers."""

    def __init__(self, sock: gevent.socket.socket, scenario: CallScenario, deadline: float) -> None:
        self.sock = sock
        self.s = scenario
        self.deadline = deadline
        self.channel, self.facts = build_channel(scenario)
        self.uuid = self.facts["uuid"] or ""
        self.result = CallResult(uuid=self.uuid, connected_at=time.monotonic())
        self.lock = gevent.lock.RLock()
        self.done = gevent.event.Event()
        self.sub = tr.Subscription()
        self.static = scenario.socket_mode == "static"
        self.socket_app_uuid = str(uuidlib.uuid4())
        self.socket_app_data = self.channel.get("variable_current_application_data") or ""
        self.queue: gevent.queue.Queue = gevent.queue.Queue()
        self.busy = False
        self.last_due = 0.0
        self.first_seen = False
        self.connected = False
        self.parked = False
        self.closed = False
        self.aborted = False
        self.cancelled = False
        self.linger: int | None = None
        self.hangup_cause: str | None = None
        self.timers: dict[str, gevent.Greenlet] = {}
        self.greenlets: list[gevent.Greenlet] = []
        self.error: BaseException | None = None  # a simulator bug, re-raised by run()

    # -- running ---------------------------------------------------------

    def run(self) -> CallResult:
        if self.s.fault == "close_on_accept":
            self.aborted = True
            self._close("switch")
        else:
            self.greenlets.append(gevent.spawn(self._read_loop))
            if not self.static:
                self.greenlets.append(gevent.spawn(self._frame_worker))
            self._start_timer("silent", self.s.silent_timeout, self._silent_expired)
            if self.s.cancel_after is not None:
                self._start_timer("cancel", self.s.cancel_after, self._cancel)
        self._check_done()
        settled = self.done.wait(max(0.0, self.deadline - time.monotonic()))
        with self.lock:
            self.result.timed_out = not settled
            self.result.outcome = self._outcome()
            self._close("switch")
        for greenlet in [*self.greenlets, *self.timers.values()]:
            greenlet.kill(block=False)
        if self.error is not None:
            raise RuntimeError("call simulator failed") from self.error
        self.result.hangup_cause = self.hangup_cause
        return self.result

    def _outcome(self) -> str:
        if self.aborted:
            return "aborted"
        if self.cancelled:
            return "cancelled"
        if self.hangup_cause:
            return "rejected"
        if not self.closed:
            return "stuck"  # the app still holds the call in the socket app
        if not self.connected:
            # Captured: a dead/silent socket parks an async call forever;
            # a static (sync) socket app just returns (README, dialplan facts).
            return "continued" if self.static else "stuck"
        if self.static and self.result.resumed:
            return "stuck"  # captured (out-sync-mode): CS_RESET forever
        # Async: listener gone -> CF_CONTROLLED cleared -> park loop exits
        # -> dialplan continues (captured after exit; after a plain close
        # not captured: per mod_event_socket/switch_ivr_park source).
        return "continued"

    def _pending(self) -> bool:
        """Could the outcome still change?"""
        if not self.closed or self.busy or not self.queue.empty():
            return True
        if self._outcome() != "stuck":
            return False
        return any(not self.timers[k].dead for k in ("park", "cancel") if k in self.timers)

    def _check_done(self) -> None:
        if not self._pending():
            self.done.set()

    def _start_timer(self, name: str, delay: float, fn: Callable[[], None]) -> None:
        old = self.timers.get(name)
        if old is not None:
            old.kill(block=False)
        self.timers[name] = gevent.spawn_later(delay, self._locked, name, fn)

    def _stop_timer(self, name: str) -> None:
        timer = self.timers.pop(name, None)
        if timer is not None and timer is not gevent.getcurrent():
            timer.kill(block=False)

    def _locked(self, name: str, fn: Callable[[], None]) -> None:
        with self.lock:
            if self.timers.get(name) is gevent.getcurrent():
                del self.timers[name]  # a running timer no longer counts as pending
            self._guarded(fn)

    def _guarded(self, fn: Callable[[], None]) -> None:
        """Run ``fn``; a simulator bug ends the call and is re-raised by run()."""
        try:
            fn()
            self._check_done()
        except Exception as exc:  # noqa: BLE001 - handed to run()
            self.error = exc
            self._close("switch")
            self.done.set()

    # -- socket ------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.sock.sendall(data)
        except OSError:
            self._close("app")
            return
        self.result.sent.append(data)

    def _close(self, by: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.result.closed_by = by
        try:
            self.sock.close()
        except OSError:
            pass
        self._stop_timer("silent")
        if self.parked:
            self.parked = False  # the park loop sees CF_CONTROLLED cleared
            self._stop_timer("park")
        elif not self.connected and not self.static and self.s.park_timeout is not None:
            # Dead socket: the call is parked now (captured: out-app-closes-park-timeout).
            self._start_timer("park", self.s.park_timeout, self._park_expired)

    def _read_loop(self) -> None:
        reader = tr.RawReader(commands=True)
        while not self.closed:
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            with self.lock:
                if not self.closed:
                    self._guarded(lambda: self._received(reader, data))

    def _received(self, reader: tr.RawReader, data: bytes) -> None:
        if not data:
            self._close("app")
            return
        try:
            items = reader.feed(data)
        except ProtocolError:
            self._close("switch")  # FreeSWITCH would drop such a peer too
            return
        for message, raw in items:
            self.result.commands.append(raw)
            self._handle(message, _command_headers(raw))
            if self.closed:
                return

    # -- replies and events ---------------------------------------------

    def _reply(self, text: str, quiet: bool = False) -> None:
        if not quiet:
            self._send(tr.command_reply(text))

    def _emit(self, item: _Item, overrides: dict[str, str] | None = None) -> None:
        name = item.name
        if not (self.sub.wants(name) or (self.sub.myevents and name in _MYEVENTS)):
            return
        self._send(tr.event_message(self._render(item, overrides or {}), self.sub.fmt))
        self.result.events.append(name)

    def _render(self, item: _Item, overrides: dict[str, str]) -> RawHeaders:
        """A captured event re-rendered for this call.

        Headers the template call had unchanged since its CHANNEL_DATA are
        channel facts: they take this call's value (or are dropped when this
        call lacks them).  Event-specific headers keep the template value,
        rewritten from the template call's facts to this call's.
        """
        src = _source(item.source)
        mapping = _mapping(src.facts, self.facts)
        out: RawHeaders = []
        for name, raw in item.headers:
            if name in overrides:
                out.append((name, tr.url_encode(overrides[name]).encode("ascii")))
            elif name in self.channel.dirty or src.channel.get(name) == raw:
                if (ours := self.channel.raw(name)) is not None:
                    out.append((name, ours))
            elif not (name.startswith("variable_") and name[9:] in src.app_vars):
                out.append((name, rewrite(name, raw, mapping)))
        return self._add_missing(out)

    def _add_missing(self, out: RawHeaders) -> RawHeaders:
        # Caller-*/variable_* this call has but the template call had not
        # (trunk-only variables, variables set by the app) go after the group.
        for prefix in ("Caller-", "variable_"):
            positions = [i for i, (n, _) in enumerate(out) if n.startswith(prefix)]
            if not positions:
                continue
            have = {n for n, _ in out}
            missing = [(n, v) for n, v in self.channel.headers if n.startswith(prefix) and n not in have]
            out[positions[-1] + 1 : positions[-1] + 1] = missing
        return out

    # -- commands ------------------------------------------------------------

    def _handle(self, message: Message, headers: dict[str, str]) -> None:
        line = message.command.strip()
        low = line.lower()
        quiet = False
        if not self.first_seen:
            self.first_seen = True
            self._stop_timer("silent")
            # mod_event_socket sends no reply to a first command other than
            # connect (not captured: per listener_run source).
            quiet = not low.startswith("connect")
        if any(low.startswith(p.lower()) for p in self.s.err_on):
            if low.startswith("api "):
                self._send(tr.api_response("-ERR simulated failure\n"))
            else:
                self._reply("-ERR simulated failure")
            return
        # Same order and prefix matching as mod_event_socket parse_command.
        if low.startswith(("exit", "...")):
            self._reply("+OK bye", quiet)
            self._send(tr.disconnect_notice(self.uuid))
            self._close("switch")
        elif low.startswith("resume"):
            self.result.resumed = True
            self.channel.set_var("socket_resume", "true")  # per source
            self._reply("+OK", quiet)
        elif low.startswith("connect"):
            self._connect()
        elif low.startswith("getvar"):
            value = self.channel.get(f"variable_{line[6:].strip()}") or ""
            self._reply(value or "-ERR command not found", quiet)  # zstr(reply) rule
        elif low.startswith("myevents"):
            self._myevents(low, quiet)
        elif low.startswith("divert_events"):
            on = low[13:].strip() == "on"
            self._reply("+OK events diverted" if on else "+OK events not diverted", quiet)
        elif low.startswith("sendmsg"):
            self._sendmsg(message, headers, line[7:].strip(), quiet)
        elif self.channel.get("Control") != "full":
            # mod_event_socket parse_command: an outbound socket without "full" stops here.
            self._reply("-ERR command not found", quiet)
        elif low.startswith("api "):
            self._api(line[4:].strip())
        elif low.startswith("bgapi "):
            self._bgapi(line[6:].strip(), quiet)
        elif low.startswith("nolinger"):
            self.linger = None
            self._reply("+OK will not linger", quiet)
        elif low.startswith("linger"):
            arg = line[6:].strip()
            self.linger = int(arg) if arg.lstrip("-").isdigit() else -1
            self._reply(f"+OK will linger {arg} seconds" if self.linger >= 0 else "+OK will linger", quiet)
        elif low.startswith("event"):
            self._reply(tr.parse_subscription(self.sub, line.split()[1:]), quiet)
        elif low.startswith("noevents"):
            active = self.sub.active
            self.sub = tr.Subscription(fmt=self.sub.fmt)
            self._reply("+OK no longer listening for events" if active else "-ERR not listening for events", quiet)
        else:
            self._reply("-ERR command not found", quiet)

    def _connect(self) -> None:
        self.connected = True
        fault = self.s.fault
        if fault == "no_connect_reply":
            self.aborted = True
            return
        if fault == "garbage_channel_data":
            self.aborted = True
            self._send(self.s.garbage)
            return
        data = self.channel.channel_data()
        if fault == "close_mid_channel_data":
            self.aborted = True
            self._send(data[: len(data) // 2])
            self._close("switch")
            return
        self._send(data)
        if not self.static and not self.parked and not self.hangup_cause:
            self.parked = True
            # switch_ivr_park consumes park_timeout (clears the variable).
            if self.channel.raw("variable_park_timeout") is not None:
                self.channel.set_var("park_timeout", None)
                self.channel.dirty.discard("variable_park_timeout")
            if self.s.park_timeout is not None:
                self._start_timer("park", self.s.park_timeout, self._park_expired)

    def _myevents(self, low: str, quiet: bool) -> None:
        if self.sub.myevents:
            self._reply("-ERR aready enabled.", quiet)  # sic, mod_event_socket
            return
        self.sub.myevents = True
        if "json" in low:
            self.sub.fmt = "json"
        self._reply("+OK Events Enabled", quiet)
        if self.s.park_event and self.parked:
            source = "out-emergency-911" if captured_facts(self.s.base_name)["auth_user"] else TRUNK_BASE
            self._emit(_template(source, "CHANNEL_PARK"))

    def _sendmsg(self, message: Message, headers: dict[str, str], target: str, quiet: bool) -> None:
        target = target or headers.get("session-id", "")
        if target and target != self.uuid:
            self._reply(f"-ERR invalid session id [{target}]", quiet)
            return
        deny = not self.hangup_cause and not self.cancelled and self._is_deny(headers)
        self._reply("+OK", quiet)
        if deny:
            self.result.verdict_at = time.monotonic()
        if self.static and headers.get("async", "").lower() != "true":
            if not self.hangup_cause:
                self._execute(headers, message.body)
        elif not self.hangup_cause:
            # Captured: executed on the parked session's next 20 ms frame.
            self.last_due = max(time.monotonic() + self.s.frame_delay, self.last_due)
            self.queue.put((self.last_due, headers, message.body))

    @staticmethod
    def _is_deny(headers: dict[str, str]) -> bool:
        command = headers.get("call-command", "").lower()
        app = headers.get("execute-app-name", "").lower()
        arg = headers.get("execute-app-arg", "")
        return command == "hangup" or (command == "execute" and (
            app == "hangup" or (app == "respond" and _respond_code(arg) >= 300)))

    def _frame_worker(self) -> None:
        while True:
            due, headers, body = self.queue.get()
            self.busy = True
            gevent.sleep(max(0.0, due - time.monotonic()))  # models the 20 ms frame
            with self.lock:
                self.busy = False
                # After the app left, switch_ivr_parse_all_events still runs
                # what was queued (per socket_function source).
                if not self.hangup_cause:
                    self._guarded(lambda: self._execute(headers, body))
                else:
                    self._check_done()

    # -- execution ---------------------------------------------------------

    def _execute(self, headers: dict[str, str], body: bytes) -> None:
        command = headers.get("call-command", "").lower()
        if command == "hangup":
            self._hangup(headers.get("hangup-cause") or "NORMAL_CLEARING", _HANGUP)
        elif command == "execute":
            arg = headers.get("execute-app-arg")
            if arg is None and headers.get("content-type") == "text/plain":
                arg = body.decode("utf-8", "replace")
            app_uuid = headers.get("event-uuid") or str(uuidlib.uuid4())
            self._run_app(headers.get("execute-app-name", ""), arg or "", app_uuid)
        # unicast/nomedia/xferext...: not simulated (accepted, no effect).

    def _run_app(self, app: str, arg: str, app_uuid: str) -> None:
        low = app.lower()
        if low == "respond" and _respond_code(arg) >= 300:
            code = _respond_code(arg)
            self._app_vars(app, arg)
            self._hangup(_SIP_TO_CAUSE.get(code, "NORMAL_UNSPECIFIED"), _RESPOND, app, arg, app_uuid,
                         sip_final=_respond_final(arg))
            return
        if low == "hangup":
            self._app_vars(app, arg)
            self._hangup(arg.strip() or "NORMAL_CLEARING", _RESPOND, app, arg, app_uuid)
            return
        app_headers = {"Application": app, "Application-Data": arg, "Application-UUID": app_uuid}
        self._app_vars(app, arg)
        self._emit(self._exec_template("CHANNEL_EXECUTE"), app_headers)
        self._apply(low, arg)
        # Captured order in EXECUTE_COMPLETE: data, then application.
        self.channel.set_var("current_application_data", arg)
        self.channel.set_var("current_application", app)
        self._emit(self._exec_template("CHANNEL_EXECUTE_COMPLETE"),
                   app_headers | {"Application-Response": "_none_"})
        if low == "set":
            self._note_allow()

    def _exec_template(self, event: str) -> _Item:
        # The base capture's own event when it has one (byte-exact replay),
        # else the one of out-allow-registered-ip.
        try:
            return _template(self.s.base_name, event, "set")
        except LookupError:
            return _template(ALLOW_BASE, event, "set")

    def _app_vars(self, app: str, arg: str) -> None:
        self.channel.set_var("current_application", app)
        self.channel.set_var("current_application_data", arg)

    def _apply(self, app: str, arg: str) -> None:
        if app in ("set", "export"):
            name, _, value = arg.partition("=")
            self._set_var(name.strip(), value or None)  # mod_dptools: empty value unsets
        elif app == "unset":
            self._set_var(arg.strip(), None)

    def _set_var(self, name: str, value: str | None) -> None:
        if name:
            self.channel.set_var(name, value)
            self.result.variables[name] = value

    def _hangup(self, cause: str, template: str, app: str | None = None, arg: str | None = None,
                app_uuid: str | None = None, sip_final: str | None = None) -> None:
        """Hang the channel up and play the captured hangup sequence."""
        if self.hangup_cause or self.cancelled:
            return
        self.hangup_cause = cause
        self.result.sip_final = sip_final or _CAUSE_TO_SIP.get(cause, _DEFAULT_SIP)
        self.parked = False
        self._stop_timer("park")
        self._play(template, cause, app, arg, app_uuid)

    def _play(self, template: str, cause: str, app: str | None, arg: str | None, app_uuid: str | None) -> None:
        common = {
            "Hangup-Cause": cause, "variable_hangup_cause": cause, "variable_hangup_cause_q850": _q850(cause),
            "variable_last_app": self.channel.get("variable_current_application") or "",
            "variable_last_arg": self.channel.get("variable_current_application_data") or "",
        }
        for item in _sequence(template):
            if not item.headers:
                if self.linger is not None:
                    self._send(tr.linger_notice(self.uuid, self.channel.get("Channel-Name") or "", self.linger))
                continue
            socket_app = item.value("Application") == "socket"
            if self.static and (item.name == "CHANNEL_UNPARK" or socket_app):
                continue  # not parked; the socket app is still running (per source)
            overrides = dict(common)
            if socket_app:
                overrides |= {"Application-UUID": self.socket_app_uuid, "Application-Data": self.socket_app_data}
            elif item.value("Application") is not None and app is not None:
                overrides |= {"Application": app, "Application-Data": arg or "", "Application-UUID": app_uuid or ""}
            self._emit(item, {k: v for k, v in overrides.items() if item.value(k) is not None})
            if self.linger is None and item.name == "CHANNEL_STATE":
                break  # not captured: per source, no linger -> disconnect now
        if self.linger is None:
            self._send(tr.disconnect_notice(self.uuid))
            self._close("switch")
        elif self.linger >= 0:
            self._start_timer("linger", self.linger, self._linger_expired)

    def _linger_expired(self) -> None:
        self._send(tr.disconnect_notice(self.uuid))
        self._close("switch")

    # -- api ------------------------------------------------------------------

    def _api(self, command: str) -> None:
        name, _, arg = command.partition(" ")
        body, after = self._api_body(name, arg)
        self._send(tr.api_response(body or "-ERR no reply\n"))  # api_exec: empty output
        if after is not None:
            after()

    def _api_body(self, name: str, arg: str) -> tuple[str, Callable[[], None] | None]:
        """mod_commands' answer (not captured except uuid_exists and version: per source)."""
        args = arg.split()
        alive = not self.hangup_cause and not self.cancelled
        mine = bool(args) and args[0] == self.uuid and alive  # locate refuses a channel going down
        if name == "uuid_exists":
            # Captured: "false" after the hangup (even while lingering).
            return ("true" if mine else "false"), None
        if name == "uuid_setvar":
            if len(args) not in (2, 3):
                return "-USAGE: <uuid> <var> [value]\n", None
            if not mine:
                return "-ERR No Such Channel!\n", None
            self._set_var(args[1], args[2] if len(args) == 3 else None)
            self._note_allow()
            return "+OK\n", None
        if name == "uuid_setvar_multi":
            return self._setvar_multi(arg, mine), None
        if name == "uuid_getvar":
            if not mine or len(args) < 2:
                return "-ERR No Such Channel!\n", None
            return self.channel.get(f"variable_{args[1]}") or "_undef_", None
        if name == "uuid_kill":
            if not mine:
                return "-ERR No Such Channel!\n", None
            self.result.verdict_at = time.monotonic()
            cause = args[1] if len(args) > 1 else "NORMAL_CLEARING"
            # Executed at once (switch_channel_hangup in the listener's thread); the events follow.
            return "+OK\n", lambda: self._hangup(cause, _HANGUP)
        if name == "version":
            return "FreeSWITCH Version 1.11.3-dev~64bit ( 64bit)\n", None  # captured
        return f"-ERR {name} Command not found!\n", None  # captured form

    def _setvar_multi(self, arg: str, mine: bool) -> str:
        usage = "-USAGE: <uuid> <var>=<value>;<var>=<value>...\n"
        _uuid, space, variables = arg.partition(" ")
        if not space:
            return ""
        if not mine:
            return "-ERR No Such Channel!\n" + usage  # no "goto done" on this branch
        out, count = "", 0
        for item in variables.split(";")[:64]:
            name, _, value = item.partition("=")
            if not name:
                out += "-ERR No variable specified\n"
                continue
            self._set_var(name, value or None)  # switch_channel_set_variable: empty unsets
            count += 1
        self._note_allow()
        return out + ("+OK\n" if count else usage)

    def _note_allow(self) -> None:
        """An allow took effect when fsguard_verdict first became "allow" (by api or an executed set)."""
        if self.channel.get("variable_fsguard_verdict") == "allow" and self.result.verdict_at is None:
            self.result.verdict_at = time.monotonic()

    def _bgapi(self, command: str, quiet: bool) -> None:
        from fsguard.testing.switch import background_job_headers  # shared template

        job = str(uuidlib.uuid4())
        self._reply(f"+OK Job-UUID: {job}\nJob-UUID: {job}", quiet)
        name, _, arg = command.partition(" ")
        body, after = self._api_body(name, arg)
        # BACKGROUND_JOB has no Unique-ID, so a myevents listener never gets it.
        if self.sub.wants("BACKGROUND_JOB") and not self.sub.myevents:
            headers = background_job_headers(job, name, arg)
            self._send(tr.event_message(tr.encode_headers(headers), self.sub.fmt, body.encode()))
            self.result.events.append("BACKGROUND_JOB")
        if after is not None:
            after()

    # -- timers ---------------------------------------------------------------

    def _silent_expired(self) -> None:
        # Captured (out-app-silent): disconnect notice, close, call stays parked.
        if not self.first_seen and not self.closed:
            self._send(tr.disconnect_notice(self.uuid))
            self._close("switch")

    def _park_expired(self) -> None:
        if self.hangup_cause or self.cancelled:
            return
        if self.parked and not self.closed:
            self._hangup("CALL_REJECTED", _HANGUP)
        elif self.closed and not self.connected:
            self.hangup_cause = "CALL_REJECTED"  # captured: 603 ~park_timeout after the dead socket
            self.result.sip_final = _CAUSE_TO_SIP["CALL_REJECTED"]
        else:
            return
        self.result.verdict_at = time.monotonic()

    def _cancel(self) -> None:
        if self.hangup_cause or self.cancelled:
            return
        if self.closed and self._outcome() != "stuck":
            return  # the call already left the socket app
        self.cancelled = True
        self.hangup_cause = "ORIGINATOR_CANCEL"
        self.result.sip_final = "487 Request Terminated"
        self.parked = False
        self._stop_timer("park")
        if self.closed:
            return
        if self.connected:
            self._play(_CANCEL, "ORIGINATOR_CANCEL", None, None, None)
        else:
            # Before connect: read_packet sees the channel down (per source).
            self._send(tr.disconnect_notice(self.uuid))
            self._close("switch")


def _command_headers(raw: bytes) -> dict[str, str]:
    """Header lines of a command as FreeSWITCH's read_packet sees them.

    FreeSWITCH looks command headers up case-insensitively and does not
    URL-decode them (protocol.Message.headers does decode %XX).
    """
    block = raw.partition(b"\n\n")[0]
    headers: dict[str, str] = {}
    for line in block.split(b"\n")[1:]:
        name, sep, value = line.rstrip(b"\r").partition(b":")
        if sep:
            headers.setdefault(name.decode("utf-8", "replace").strip().lower(),
                               value.lstrip(b" ").decode("utf-8", "replace"))
    return headers


def _respond_code(arg: str) -> int:
    head = arg.strip().split(" ", 1)[0]
    return int(head) if head.isdigit() else 0


def _respond_final(arg: str) -> str:
    code = _respond_code(arg)
    phrase = arg.strip().partition(" ")[2].strip().strip('"')
    return f"{code} {phrase or _PHRASES.get(code, '')}".strip()


# --------------------------------------------------------------------------
# Entry points.


def place_call(address: tuple[str, int], scenario: CallScenario | None = None, timeout: float = 5.0) -> CallResult:
    """Simulate one call whose dialplan runs ``socket <address> ...``."""
    scenario = scenario or CallScenario()
    deadline = time.monotonic() + timeout
    try:
        sock = gevent.socket.create_connection(address, timeout=timeout)
    except ConnectionRefusedError:
        # Captured (out-socket-target-down): FreeSWITCH logs and continues.
        facts = build_channel(scenario)[1]
        return CallResult(uuid=facts["uuid"] or "", outcome="continued", refused=True)
    sock.settimeout(None)
    return _Call(sock, scenario, deadline).run()


def place_calls(address: tuple[str, int], scenarios: Iterable[CallScenario], concurrency: int = 10,
                timeout: float = 5.0) -> list[CallResult]:
    """Run several calls, at most ``concurrency`` at a time; results in order."""
    pool = gevent.pool.Pool(concurrency)
    return list(pool.imap(lambda s: place_call(address, s, timeout), scenarios))
