"""ESL outbound: FreeSWITCH's ``socket`` application connects here per call.

Served by gevent's StreamServer with a Pool rather than greenswitch's
OutboundESLServer, which polls accept() every 0.1 s, exits 0 when the bind
fails and drops calls over capacity without a verdict.

One conversation per call, two writes, every wait under ``command_timeout``::

    connect + linger      -> channel data (the call's facts); the socket now
                             stays open after a hangup until we say exit
    decide
    allow: api uuid_setvar_multi <uuid> fsguard_reason=...;fsguard_verdict=allow
    deny:  api uuid_kill <uuid> CALL_REJECTED        (caller gets 603 Decline)
    + exit                -> FreeSWITCH's dialplan continues after ``socket``

Why ``api`` and not ``sendmsg``: an ``api`` command runs in the ESL listener
itself and its ``+OK`` means the variable is set / the channel hung up
(mod_commands.c, mod_event_socket.c).  A ``sendmsg execute set`` is only
done once its CHANNEL_EXECUTE_COMPLETE arrives: in async mode on the parked
session's next 20 ms frame (captured), and it brings four ~6 KB events per
call.  No ``myevents``: nothing here waits for an event; a hangup while we
decide shows as linger's disconnect notice (sent with or without events)
and as ``-ERR No Such Channel!`` from the api command.  Commands are
pipelined: FreeSWITCH reads them one by one and answers in order.  All of
this needs ``socket ... full`` (``linger`` and ``api`` are refused otherwise),
as the shipped dialplans use.  What a real FreeSWITCH must confirm is listed
in docker/README.rst.

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
from .protocol import Message, ProtocolError, command

log = logging.getLogger(__name__)


REJECT_CAUSE = "CALL_REJECTED"  # sofia answers it with 603 Decline (captured)


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
        self.hung_up = False

    def request(self, *commands: bytes) -> list[Message]:
        """Send commands in one write and return their replies, in order.

        FreeSWITCH reads an outbound socket's commands one by one and answers
        them in the order they arrive, so pipelining them saves round trips
        without changing what is said.  A disconnect notice seen meanwhile
        (``linger``: the caller hung up) is noted; events are not expected.
        """
        self.connection.send(b"".join(commands))
        deadline = time.monotonic() + self.timeout
        replies: list[Message] = []
        while len(replies) < len(commands):
            message = self.connection.read(max(deadline - time.monotonic(), 0.001))
            if message.is_reply:
                replies.append(message)
            elif message.content_type == "text/disconnect-notice":
                self.hung_up = True
        return replies


def verdict_command(uuid: str, action: Action, reason: str) -> bytes:
    """The ``api`` command that makes the verdict effective on channel ``uuid``."""
    if not uuid or not uuid.isascii() or not uuid.isprintable() or " " in uuid or ";" in uuid:
        raise ProtocolError(f"channel uuid {uuid[:60]!r} cannot be used in an api command")
    if action is Action.DENY:
        return command(f"api uuid_kill {uuid} {REJECT_CAUSE}")
    if not reason.replace("-", "").isalnum():  # uuid_setvar_multi splits on ';', our reasons are slugs
        raise ValueError(f"reason {reason!r} is not a plain word")
    return command(f"api uuid_setvar_multi {uuid} fsguard_reason={reason};fsguard_verdict={action}")


def _channel_gone(reply: Message) -> bool:
    # mod_commands: uuid_kill / uuid_setvar_multi on a channel that is gone or hanging up.
    return reply.text.lower().startswith("-err no such channel")


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
        channel, lingering = talk.request(command("connect"), command("linger"))
        facts = facts_from_channel_data(channel.headers, self.proxy_header)
        if not facts.uuid:
            raise ProtocolError("connect reply carries no channel data")
        if not lingering.ok:
            raise ESLError(f"FreeSWITCH refused linger ({lingering.reply_text!r}): the dialplan must call "
                           "the socket application with 'full' (e.g. socket 127.0.0.1:8084 full)")
        outcome.decision = decision = self.decide(facts, may_look_up)
        if talk.hung_up:  # the caller gave up while we decided (CANCEL)
            outcome.caller_hung_up = True
            talk.request(command("exit"))
            return
        verdict = decision.verdict
        applied, _bye = talk.request(verdict_command(facts.uuid, verdict.action, verdict.reason), command("exit"))
        if applied.ok:
            outcome.effective = True
        elif talk.hung_up or _channel_gone(applied):
            outcome.caller_hung_up = True
        else:
            raise ESLError(f"FreeSWITCH refused the verdict: {applied.text.strip()[:200]!r}")

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
