"""A gevent socket that speaks ESL, with a deadline on every read."""

from __future__ import annotations

import socket
from collections import deque

import gevent

from .protocol import Message, MessageReader


class ESLError(Exception):
    """Base of the connection failures below."""


class ConnectionClosed(ESLError):
    """The peer closed the connection (or it broke)."""


class ESLTimeout(ESLError):
    """The peer did not send a complete message before the deadline."""


class Connection:
    """Reads whole ESL messages from a socket.

    The deadline covers the whole message, not each ``recv``: a peer that
    trickles one byte a second cannot hold a reader past it.
    """

    def __init__(self, sock: socket.socket, reader: MessageReader | None = None) -> None:
        self.sock = sock
        self.reader = reader or MessageReader()
        self._inbox: deque[Message] = deque()
        self.closed = False

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            self.closed = True
            raise ConnectionClosed(f"send failed: {exc}") from None

    def read(self, timeout: float) -> Message:
        if not self._inbox:
            with gevent.Timeout(timeout, False):  # silent: the error below is built only when it fires
                while not self._inbox:
                    self._receive()
            if not self._inbox:
                raise ESLTimeout(f"no complete ESL message within {timeout:g}s")
        return self._inbox.popleft()

    def _receive(self) -> None:
        if self.closed:
            raise ConnectionClosed("connection already closed")
        try:
            data = self.sock.recv(65536)
        except OSError as exc:
            self.closed = True
            raise ConnectionClosed(f"receive failed: {exc}") from None
        if not data:
            self.closed = True
            raise ConnectionClosed("peer closed the connection")
        self._inbox.extend(self.reader.feed(data))

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass
