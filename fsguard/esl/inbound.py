"""ESL inbound: fsguard's own connections to each FreeSWITCH node.

``SwitchClient`` keeps greenswitch's InboundESL for what it does well (auth
handshake, FIFO matching of replies to commands, event handler registry and
dispatch) and replaces what is weak, without forking it:

* framing: greenswitch reads line by line, URL-decodes the whole payload
  before splitting it, dies silently on one invalid UTF-8 byte and spins on
  a body cut short by EOF.  ``receive_events`` here feeds fsguard's bounded
  MessageReader instead;
* ``send`` had no lock and no timeout: here commands are serialised and
  every wait has a deadline; a timed-out connection is closed, since a late
  reply would otherwise be matched to the next command;
* a dropped connection fails the commands waiting on it at once;
* greenswitch hangs when the same instance reconnects: callers make a new
  SwitchClient per connection (``SwitchLink`` does).
"""

from __future__ import annotations

import logging
import re
from gevent import socket
import time

import gevent
import gevent.lock
from gevent.event import AsyncResult
from greenswitch.esl import InboundESL, NotConnectedError

from ..config import SwitchConfig
from ..registrations import MAX_REPLY, LookupFailed, Registrations, parse_xmlstatus
from .protocol import Message, MessageReader, ProtocolError

log = logging.getLogger(__name__)



def _describe(command: str) -> str:
    """A command for a log line: never the password of ``auth``."""
    words = command.split(" ", 2)
    return "auth ***" if words[0] == "auth" else " ".join(words[:2])


class SwitchClient(InboundESL):
    """One authenticated inbound ESL connection."""

    def __init__(self, host: str, port: int, password: str, timeout: float = 5.0) -> None:
        super().__init__(host, port, password, timeout=timeout)
        self._lock = gevent.lock.BoundedSemaphore()
        self.close_reason = ""

    def connect(self) -> None:
        try:
            self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as exc:
            raise NotConnectedError(f"cannot connect to {self.host}:{self.port}: {exc}") from None
        self.sock.settimeout(None)
        self.connected = True
        self.sock_file = self.sock.makefile("rb")  # greenswitch's stop() closes it
        self.start_event_handlers()
        if not self._auth_request_event.wait(self.timeout) or not self.connected:
            reason = self.close_reason or "no auth/request greeting"
            self._abort(reason)
            raise NotConnectedError(f"{self.host}:{self.port} refused the session: {reason}")
        reply = self.send(f"auth {self.password}")
        if reply.headers.get("Reply-Text") != "+OK accepted":
            self._abort("authentication refused")
            raise NotConnectedError(f"{self.host}:{self.port}: ESL authentication refused")

    # -- framing -----------------------------------------------------------

    def receive_events(self) -> None:
        # api replies can be large (a profile's whole registration list).
        reader = MessageReader(max_body=MAX_REPLY)
        try:
            while self._run:
                data = self.sock.recv(65536)
                if not data:
                    self.close_reason = self.close_reason or "connection closed by the switch"
                    break
                for message in reader.feed(data):
                    self._dispatch(message)
        except ProtocolError as exc:
            self.close_reason = f"protocol error: {exc}"
        except OSError as exc:
            self.close_reason = self.close_reason or f"connection error: {exc}"
        finally:
            self._lost()

    def _dispatch(self, message: Message) -> None:
        kind = message.content_type
        if kind == "auth/request":
            self._auth_request_event.set()
        elif kind in ("command/reply", "api/response"):
            if self._commands_sent:
                self._commands_sent.pop(0).set(message)
        elif kind == "text/rude-rejection":
            self.close_reason = f"rejected: {message.text.strip()}"
        elif kind == "text/disconnect-notice":
            self.close_reason = self.close_reason or message.text.strip() or "disconnect notice"
        else:
            try:
                event = message.event()
                if event is not None:
                    event.headers  # decode the whole block now, so that a bad one is caught here
            except ProtocolError as exc:
                # Framing is intact (Content-Length): skip this event, keep the connection.
                log.warning("%s:%s: unreadable event skipped: %s", self.host, self.port, exc)
                return
            if event is not None:
                self._esl_event_queue.put(event)

    def _lost(self) -> None:
        self.connected = False
        self._run = False
        self._auth_request_event.set()
        pending, self._commands_sent = self._commands_sent, []
        for result in pending:
            result.set_exception(NotConnectedError(self.close_reason or "connection lost"))
        try:
            self.sock.close()
        except OSError:
            pass

    def _abort(self, reason: str) -> None:
        self.close_reason = self.close_reason or reason
        self._run = False
        sock = getattr(self, "sock", None)  # absent when the connect itself failed
        if sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- commands ----------------------------------------------------------

    def send(self, data: str, timeout: float | None = None) -> Message:
        """Send one command; return its reply or raise NotConnectedError."""
        if "\n" in data or "\r" in data:
            raise ValueError("line break inside an ESL command")
        timeout = self.timeout if timeout is None else timeout
        with self._lock:
            if not self.connected:
                raise NotConnectedError(self.close_reason or "not connected")
            result: AsyncResult = AsyncResult()
            self._commands_sent.append(result)
            try:
                self.sock.sendall(f"{data}\n\n".encode())
                return result.get(timeout=timeout)
            except gevent.Timeout:
                self._abort(f"no reply to {_describe(data)!r} within {timeout:g}s")
                raise NotConnectedError(self.close_reason) from None
            except OSError as exc:
                self._abort(f"send failed: {exc}")
                raise NotConnectedError(self.close_reason) from None

    def api(self, command: str, timeout: float | None = None) -> Message:
        return self.send(f"api {command}", timeout)

    def close(self) -> None:
        self._abort("closed by fsguard")


_SAFE_USER = re.compile(r"[A-Za-z0-9._+\-*#!~$%&'=]{1,128}")
_SAFE_HOST = re.compile(r"[A-Za-z0-9.\-:\[\]]{1,255}")
_SAFE_PROFILE = re.compile(r"[A-Za-z0-9._\-]{1,64}")


def xmlstatus_user_command(profile: str, user: str, domain: str) -> str:
    """The api command for one extension's registrations, refusing unsafe input.

    The values come from channel data; anything that could split the
    command (space, line break) or is not a plausible SIP user/host is
    refused rather than sent.
    """
    if not (_SAFE_PROFILE.fullmatch(profile) and _SAFE_USER.fullmatch(user) and _SAFE_HOST.fullmatch(domain)):
        raise LookupFailed(f"refusing to look up unsafe identity {user!r}@{domain!r} on profile {profile!r}")
    return f"sofia xmlstatus profile {profile} user {user}@{domain}"


class SwitchLink:
    """A switch's lookup connections: opened on demand, at most ``size``, replaced when lost.

    FreeSWITCH answers one connection's ``api`` commands one after the other,
    so a single connection queued every lookup behind the previous one
    (at saturation denies, which are confirmed live, waited ~0.5 s).  A few
    connections let lookups run side by side.
    """

    def __init__(self, config: SwitchConfig, timeout: float, size: int = 4) -> None:
        self.config = config
        self.timeout = timeout
        self.size = size
        self._idle: list[SwitchClient] = []
        self._all: set[SwitchClient] = set()
        self._slots = gevent.lock.BoundedSemaphore(size)

    @property
    def name(self) -> str:
        return self.config.name

    def _take(self) -> SwitchClient:
        while self._idle:
            client = self._idle.pop()
            if client.connected:
                return client
            self._all.discard(client)
        client = SwitchClient(self.config.host, self.config.port, self.config.password, self.timeout)
        client.connect()
        log.info("switch=%s lookup connection %d/%d to %s:%s", self.name, len(self._all) + 1, self.size,
                 self.config.host, self.config.port)
        self._all.add(client)
        return client

    def api(self, command: str) -> bytes:
        with self._slots:
            client: SwitchClient | None = None
            try:
                client = self._take()
                reply = client.api(command)
            except NotConnectedError as exc:
                if client is not None:
                    self._all.discard(client)  # timed out or dropped: never reused
                raise LookupFailed(f"switch {self.name}: {exc}") from None
            if client.connected:
                self._idle.append(client)
            else:
                self._all.discard(client)
        if reply.content_type != "api/response":
            raise LookupFailed(f"switch {self.name}: unexpected reply {reply.content_type!r}")
        return reply.body

    def close(self) -> None:
        for client in list(self._all):
            client.close()
        self._all.clear()
        self._idle.clear()


class LiveLookup:
    """Asks every configured switch, in parallel; the answer is their union.

    A device may be registered on one node of a cluster and call through
    another, so a binding found on any switch counts.  Switches that could
    not answer are listed in ``Registrations.errors``; when none answered,
    LookupFailed.
    """

    source = "live"

    def __init__(self, links: list[SwitchLink], clock=time.time) -> None:
        self.links = links
        self.clock = clock

    def lookup(self, profile: str, user: str, domain: str, links: list[SwitchLink] | None = None) -> Registrations:
        links = self.links if links is None else links
        command = xmlstatus_user_command(profile, user, domain)
        jobs = [gevent.spawn(self._ask, link, command, profile) for link in links]
        try:
            gevent.joinall(jobs, raise_error=False)
        finally:
            gevent.killall(jobs, block=False)  # the caller's deadline may cut us short
        bindings, errors = [], []
        for link, job in zip(links, jobs):
            if job.successful() and not isinstance(job.value, Exception):
                bindings.extend(job.value)
            else:
                errors.append(f"{link.name}: {job.value if job.successful() else job.exception}")
        if len(errors) == len(links):
            raise LookupFailed("; ".join(errors) or "no switch to ask")
        return Registrations(f"{user}@{domain}".lower(), tuple(bindings), self.source, tuple(errors))

    def _ask(self, link: SwitchLink, command: str, profile: str) -> list | LookupFailed:
        # A failure is a value here, not a greenlet crash for gevent to print.
        try:
            return parse_xmlstatus(link.api(command), self.clock(), profile=profile, switch=link.name)
        except LookupFailed as exc:
            return exc

    lookup_live = lookup

    def close(self) -> None:
        for link in self.links:
            link.close()
