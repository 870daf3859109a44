"""The control endpoint: a Unix socket (0600) answering JSON, one line each way.

The daemon answers data (``status``, ``check``); the CLI formats it.  Frames
are bounded (``MAX_FRAME``), every read has a deadline, and nothing but JSON
crosses the socket (no pickle).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
from collections.abc import Callable
from typing import Any

import gevent
from gevent.server import StreamServer

log = logging.getLogger(__name__)

MAX_FRAME = 64 * 1024
READ_TIMEOUT = 5.0

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlError(Exception):
    """The control endpoint could not be reached or did not answer properly."""


def _read_line(sock: socket.socket, limit: int = MAX_FRAME) -> bytes:
    data = bytearray()
    while b"\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > limit:
            raise ValueError(f"frame larger than {limit} bytes")
    line, _, _ = bytes(data).partition(b"\n")
    return line


class ControlServer:
    def __init__(self, path: str, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers
        self.server: StreamServer | None = None

    def start(self) -> None:
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, mode=0o750, exist_ok=True)
        self._remove_stale()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket is born 0600: no window where others may connect
        try:
            listener.bind(self.path)
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        listener.listen(16)
        self.server = StreamServer(listener, self._handle)
        self.server.start()

    def _remove_stale(self) -> None:
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise OSError(f"{self.path} exists and is not a socket")
        try:
            request(self.path, {"command": "ping"}, timeout=1.0)
        except ControlError:
            os.unlink(self.path)  # left over by a daemon that died
            return
        raise OSError(f"another fsguard answers on {self.path}")

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(timeout=1)
            self.server = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def _handle(self, sock: socket.socket, _address: Any) -> None:
        try:
            with gevent.Timeout(READ_TIMEOUT):
                line = _read_line(sock)
            reply = self._dispatch(line)
        except gevent.Timeout:
            reply = {"ok": False, "error": "request not received in time"}
        except ValueError as exc:
            reply = {"ok": False, "error": str(exc)}
        try:
            sock.sendall(json.dumps(reply, default=str).encode() + b"\n")
        except OSError:
            pass
        finally:
            sock.close()

    def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            payload = json.loads(line)
        except ValueError:
            return {"ok": False, "error": "request is not JSON"}
        if not isinstance(payload, dict) or not isinstance(payload.get("command"), str):
            return {"ok": False, "error": 'request must be a JSON object with a "command"'}
        if payload["command"] == "ping":
            return {"ok": True}
        handler = self.handlers.get(payload["command"])
        if handler is None:
            return {"ok": False, "error": f"unknown command {payload['command']!r}"}
        try:
            return {"ok": True, **handler(payload)}
        except ValueError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:
            log.exception("control command %r failed", payload["command"])
            return {"ok": False, "error": f"internal error: {exc!r}"}


def request(path: str, payload: dict[str, Any], timeout: float = READ_TIMEOUT) -> dict[str, Any]:
    """Send one request to the daemon's control socket; raise ControlError on failure."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(json.dumps(payload).encode() + b"\n")
            line = _read_line(sock, limit=16 * MAX_FRAME)
    except (OSError, ValueError) as exc:
        raise ControlError(f"cannot reach fsguard at {path}: {exc}") from None
    try:
        reply = json.loads(line)
    except ValueError:
        raise ControlError(f"fsguard at {path} answered something that is not JSON") from None
    if not isinstance(reply, dict):
        raise ControlError(f"fsguard at {path} answered {reply!r}")
    return reply
