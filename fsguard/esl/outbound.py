"""ESL outbound: FreeSWITCH's ``socket`` application connects here per call.

Served by gevent's StreamServer with a Pool rather than greenswitch's
OutboundESLServer, which polls accept() every 0.1 s, exits 0 when the bind
fails and drops calls over capacity without a verdict.

One conversation per call, every wait under ``command_timeout``::

    connect   -> channel data (the call's facts)
    myevents  -> the call's events (hangup, execute-complete) reach us
    linger    -> after a hangup the socket stays until we say exit
    decide
    deny:  sendmsg hangup CALL_REJECTED   (caller gets 603 Decline), wait for the hangup
    allow: sendmsg execute set fsguard_reason=..., set fsguard_verdict=allow,
           wait for the set's CHANNEL_EXECUTE_COMPLETE
    exit      -> FreeSWITCH's dialplan continues after ``socket``

Never ``resume``: it leaves sync-mode (``socket ... full``) calls stuck in
CS_RESET (out-sync-mode capture).  A handler that fails before the verdict
closes the socket; the shipped dialplan refuses every call whose
``fsguard_verdict`` is not ``allow``, so a crash cannot let a call through.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from gevent.pool import Pool
from gevent.server import StreamServer

from ..call import DEFAULT_PROXY_HEADER, Network, facts_from_channel_data, in_networks, parse_ip
from ..guard import Decision
from ..policy import Action
from .connection import Connection, ESLError
from .protocol import Event, Message, ProtocolError, command, execute, hangup

log = logging.getLogger(__name__)


HANGUP_EVENTS = frozenset({"CHANNEL_HANGUP", "CHANNEL_HANGUP_COMPLETE"})


class CallGone(Exception):
    """The caller hung up (or FreeSWITCH let go of the session)."""


@dataclass
class CallOutcome:
    """What happened on the wire, for logs, audit and tests."""

    decision: Decision | None = None
    effective: bool = False  # FreeSWITCH confirmed the verdict took effect
    caller_hung_up: bool = False
    error: str = ""


class CallConversation:
    """The ESL exchange for one call; single greenlet, no background reader."""

    def __init__(self, connection: Connection, timeout: float) -> None:
        self.connection = connection
        self.timeout = timeout
        self.events: list[Event] = []
        self.hung_up = False

    def request(self, *commands: bytes) -> list[Message]:
        """Send commands in one write and return their replies, in order.

        FreeSWITCH answers an outbound socket's commands one by one, in the
        order they arrive, so pipelining them saves round trips without
        changing what is said.  Events seen meanwhile are kept.
        """
        self.connection.send(b"".join(commands))
        deadline = time.monotonic() + self.timeout
        replies: list[Message] = []
        while len(replies) < len(commands):
            message = self.connection.read(max(deadline - time.monotonic(), 0.001))
            if message.is_reply:
                replies.append(message)
            else:
                self._note(message)
        return replies

    def wait_for(self, wanted: Callable[[Event], bool]) -> Event:
        """Wait for an event of this call; raise CallGone if the caller hangs up first."""
        deadline = time.monotonic() + self.timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if wanted(event):
                    return event
            seen = len(self.events)
            if self.hung_up:
                raise CallGone()
            message = self.connection.read(max(deadline - time.monotonic(), 0.001))
            if not message.is_reply:
                self._note(message)

    def _note(self, message: Message) -> None:
        if message.content_type == "text/disconnect-notice":
            # "linger": the call is over, FreeSWITCH holds the socket for us.
            self.hung_up = True
            return
        event = message.event()
        if event is None:
            return
        self.events.append(event)
        if event.name in HANGUP_EVENTS:
            self.hung_up = True


def _accepted(*replies: Message) -> None:
    """A command FreeSWITCH refused (-ERR) will not take effect: say so now, not at the deadline."""
    for reply in replies:
        if not reply.ok:
            raise ESLError(f"FreeSWITCH refused the command: {reply.reply_text or reply.text!r}")


def _is_verdict_set(event: Event) -> bool:
    return (
        event.name == "CHANNEL_EXECUTE_COMPLETE"
        and event.get("Application") == "set"
        and (event.get("Application-Data") or "").startswith("fsguard_verdict=")
    )


def _is_hangup(event: Event) -> bool:
    return event.name in HANGUP_EVENTS


class OutboundServer:
    """Accepts FreeSWITCH's outbound connections and decides each call.

    Only addresses in ``accept_from`` may connect; others are closed at once
    and counted.  Up to ``max_connections`` calls are decided normally; past
    that, a small overflow is still answered at once without a lookup (the
    ``over_capacity`` verdict; emergency and uncredentialed calls keep their
    usual verdict), so no call is dropped without a verdict.  Beyond the
    overflow (3 x max_connections, at least 256) the kernel's backlog holds
    connections until a slot frees.
    """

    def __init__(
        self,
        listen: tuple[str, int],
        decide: Callable[..., Decision],
        command_timeout: float,
        max_connections: int,
        on_outcome: Callable[[CallOutcome], None] | None = None,
        proxy_header: str = DEFAULT_PROXY_HEADER,
        accept_from: tuple[Network, ...] = (),
    ) -> None:
        self.decide = decide
        self.command_timeout = command_timeout
        self.proxy_header = proxy_header
        self.on_outcome = on_outcome
        self.accept_from = accept_from
        self.max_connections = max_connections
        self.refused: Counter[str] = Counter()  # source address -> connections refused
        # The overflow is answered without a lookup; greenlets are cheap, so it is
        # large: idle or trickling connections (cut at command_timeout) cannot
        # push a real call into the kernel's backlog.
        self.pool = Pool(max_connections + max(256, 3 * max_connections))
        self.server = StreamServer(listen, self._accept, spawn=self.pool, backlog=1024)

    @property
    def address(self) -> tuple[str, int]:
        return self.server.address[:2]

    def start(self) -> None:
        """Bind and listen; raises OSError when the address is unusable."""
        self.server.start()

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting; wait up to ``grace`` seconds for calls in progress."""
        self.server.stop(timeout=grace)

    def _accept(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        if self.accept_from and not in_networks(parse_ip(peer[0]), self.accept_from):
            sock.close()
            if not self.refused[peer[0]]:
                log.warning("refused outbound connection from %s: not in guard.accept_from", peer[0])
            self.refused[peer[0]] += 1
            return
        self._handle(sock, peer, may_look_up=len(self.pool) <= self.max_connections)

    def _handle(self, sock: socket.socket, peer: tuple[str, int], may_look_up: bool = True) -> None:
        connection = Connection(sock)
        outcome = CallOutcome()
        try:
            self._converse(CallConversation(connection, self.command_timeout), outcome, may_look_up)
        except ESLError as exc:
            outcome.error = str(exc)
        except ProtocolError as exc:
            outcome.error = f"protocol error: {exc}"
        except Exception as exc:  # never let one call take the server down
            outcome.error = f"internal error: {exc!r}"
            log.exception("call from %s: handler failed", peer[0])
        finally:
            connection.close()
        self._report(outcome, peer)

    def _converse(self, talk: CallConversation, outcome: CallOutcome, may_look_up: bool = True) -> None:
        [channel] = talk.request(command("connect"))
        facts = facts_from_channel_data(channel.headers, self.proxy_header)
        if not facts.uuid:
            raise ProtocolError("connect reply carries no channel data")
        talk.request(command("myevents"), command("linger"))
        outcome.decision = decision = self.decide(facts, may_look_up)
        try:
            if talk.hung_up:
                raise CallGone()  # the caller gave up while we decided (CANCEL)
            if decision.verdict.action is Action.DENY:
                _accepted(*talk.request(hangup("CALL_REJECTED")))
                talk.wait_for(_is_hangup)  # our own hangup: the refusal took effect
            else:
                _accepted(*talk.request(execute("set", f"fsguard_reason={decision.verdict.reason}"),
                                        execute("set", f"fsguard_verdict={decision.verdict.action}")))
                talk.wait_for(_is_verdict_set)
            outcome.effective = True
        except CallGone:
            outcome.caller_hung_up = True
        talk.request(command("exit"))

    def _report(self, outcome: CallOutcome, peer: tuple[str, int]) -> None:
        log_decision(outcome, peer)
        if self.on_outcome is not None:
            try:
                self.on_outcome(outcome)
            except Exception:
                log.exception("outcome hook failed")


def log_decision(outcome: CallOutcome, peer: tuple[str, int]) -> None:
    """One ``key=value`` line per call; denies at WARNING (fail2ban-friendly)."""
    decision = outcome.decision
    if decision is None:
        log.error("call-failed switch=%s error=%r", peer[0], outcome.error)
        return
    call, verdict = decision.call, decision.verdict
    error = outcome.error or decision.error
    level = logging.WARNING if verdict.action is Action.DENY else logging.INFO
    log.log(
        level,
        "decision uuid=%s identity=%s source=%s destination=%s verdict=%s reason=%s rule=%s "
        "registered=%s lookup=%s latency_ms=%.2f effective=%s caller_hung_up=%s%s",
        call.uuid,
        call.identity or "-",
        call.source_ip or "-",
        call.destination or "-",
        verdict.action,
        verdict.reason,
        verdict.rule,
        ",".join(verdict.registered_ips) or "-",
        decision.lookup,
        decision.latency * 1000,
        "yes" if outcome.effective else "no",
        "yes" if outcome.caller_hung_up else "no",
        f" error={error!r}" if error else "",
    )
