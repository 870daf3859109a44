"""The daemon's lifecycle: build the parts from the config, serve, stop.

Signals only set an event; the main greenlet acts on it (gunicorn's arbiter
pattern), so no handler runs I/O in signal context.
"""

from __future__ import annotations

import logging
import signal
import sys

import gevent
from gevent.event import Event

from .config import Config
from .esl.inbound import LiveLookup, SwitchLink
from .esl.outbound import OutboundServer
from .esl.watcher import Watcher
from .guard import Guard
from .lookup import CachedLookup
from .registrations import RegistrationCache, RegistrationSource

log = logging.getLogger(__name__)

# Exit codes (documented in README.rst), after sysexits.h.
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_CONFIG = 78  # EX_CONFIG: the configuration is invalid
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: the listen address cannot be bound

STOP_GRACE = 10.0  # seconds for in-flight decisions on SIGTERM


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.live = LiveLookup([SwitchLink(s, config.command_timeout) for s in config.switches])
        self.cache = RegistrationCache()
        self.watchers: list[Watcher] = []
        source: RegistrationSource = self.live
        if config.registrations == "cache":
            self.watchers = [
                Watcher(s, self.cache, config.command_timeout, config.expiry_margin) for s in config.switches
            ]
            source = CachedLookup(self.cache, self.watchers, self.live)
        self.guard = Guard(config.policy, source, config.decision_timeout)
        self.server = OutboundServer(
            config.listen,
            self.guard.decide,
            command_timeout=config.command_timeout,
            max_connections=config.max_connections,
        )
        self._stop = Event()

    def start(self) -> None:
        self.server.start()
        for watcher in self.watchers:
            watcher.start()
        host, port = self.server.address
        log.info(
            "listening on %s:%s mode=%s on_error=%s registrations=%s switches=%s",
            host,
            port,
            self.config.policy.mode,
            self.config.policy.on_error,
            self.config.registrations,
            ",".join(s.name for s in self.config.switches),
        )

    def request_stop(self) -> None:
        self._stop.set()

    def serve_forever(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            gevent.signal_handler(signum, self.request_stop)
        self._stop.wait()
        self.stop(STOP_GRACE)

    def stop(self, grace: float) -> None:
        log.info("stopping: no new calls, up to %gs for calls in progress", grace)
        self.server.stop(grace=grace)
        for watcher in self.watchers:
            watcher.stop()
        self.live.close()
        log.info("stopped")


def configure_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def run(config: Config) -> int:
    configure_logging(config.log_level)
    daemon = Daemon(config)
    try:
        daemon.start()
    except OSError as exc:
        host, port = config.listen
        log.error("cannot listen on %s:%s (guard.listen): %s", host, port, exc.strerror or exc)
        return EXIT_UNAVAILABLE
    daemon.serve_forever()
    return EXIT_OK
