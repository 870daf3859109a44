"""The daemon's lifecycle: build the parts from the config, serve, reload, stop.

Signals only enqueue; the main greenlet acts on them (gunicorn's arbiter
pattern): TERM/INT stop (no new calls, in-flight calls finish within the
grace period, the audit is flushed), HUP reloads the configuration
(validated completely first; on error the old one stays), USR1 reopens the
log file.
"""

from __future__ import annotations

import gc
import logging
import signal
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import gevent
from gevent.queue import Queue

from . import __version__, systemd
from .call import CallFacts
from .config import Config, ConfigError, load
from .control import ControlServer
from .esl.inbound import LiveLookup, SwitchLink
from .esl.outbound import CallOutcome, OutboundServer
from .esl.watcher import Watcher
from .guard import Decision, Guard
from .lookup import CachedLookup
from .metrics import Metrics
from .registrations import RegistrationCache, RegistrationSource
from .stats import RecentDecisions

log = logging.getLogger(__name__)

GC_YOUNG_THRESHOLD = 50_000  # net allocations between young-generation collections (CPython's default: 700)

# Exit codes (documented in README.rst), after sysexits.h.
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: a listen address cannot be bound
EXIT_SOFTWARE = 70  # EX_SOFTWARE: the audit database cannot be used (schema behind, unreachable)
EXIT_CONFIG = 78  # EX_CONFIG: the configuration is invalid

STOP_GRACE = 10.0  # seconds for in-flight decisions on SIGTERM
AUDIT_FLUSH = 10.0  # seconds to flush the audit queue on stop

RESTART_ONLY = ("listen", "switches", "audit", "control_socket", "metrics_listen", "registrations", "log_file")


class StartupError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class Daemon:
    def __init__(self, config: Config, audit: Any = None) -> None:
        self.config = config
        self.started_at = time.time()
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
            on_outcome=self._record,
            proxy_header=config.proxy_header,
            accept_from=config.accept_from,
        )
        self.audit = audit if audit is not None else _audit_writer(config)
        self.recent = RecentDecisions()
        self.metrics = Metrics(self.status)
        self.control = ControlServer(config.control_socket, {"status": self._status_command, "check": self.check})
        self._signals: Queue = Queue()
        self._watchdog: gevent.Greenlet | None = None

    # -- start / stop --------------------------------------------------------

    def start(self) -> None:
        """Bind everything, then tell systemd READY; raises StartupError."""
        self._check_audit()
        try:
            self.server.start()
        except OSError as exc:
            host, port = self.config.listen
            raise StartupError(f"cannot listen on {host}:{port} (guard.listen): {exc.strerror or exc}",
                               EXIT_UNAVAILABLE) from None
        try:
            self.control.start()
        except OSError as exc:
            self.server.stop()
            raise StartupError(f"cannot open {self.config.control_socket} (guard.control_socket): {exc}",
                               EXIT_UNAVAILABLE) from None
        if self.config.metrics_listen:
            try:
                self.metrics.serve(self.config.metrics_listen)
            except OSError as exc:
                self.server.stop()
                self.control.stop()
                host, port = self.config.metrics_listen
                raise StartupError(f"cannot listen on {host}:{port} (guard.metrics_listen): "
                                   f"{exc.strerror or exc}", EXIT_UNAVAILABLE) from None
        if self.audit is not None:
            self.audit.start()
        for watcher in self.watchers:
            watcher.start()
        # What start-up built (modules, SQLAlchemy's metadata, the policy) lives as long as the
        # process: keep it out of the cyclic GC's full collections, which otherwise pause every call
        # (see the watcher for the registrations; benchmarks/outbound_bench.py measured the pauses).
        # Calls free what they allocate by refcounting; collecting the young generation after every
        # 700 net allocations (the default) cost ~10% of a decision's CPU and its p99 at 500 calls/s.
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 10)
        host, port = self.server.address
        log.info(
            "listening on %s:%s version=%s mode=%s on_error=%s registrations=%s switches=%s control=%s metrics=%s",
            host, port, __version__, self.config.policy.mode, self.config.policy.on_error,
            self.config.registrations, ",".join(s.name for s in self.config.switches),
            self.config.control_socket, self._metrics_address() or "off",
        )
        systemd.notify(f"READY=1\nSTATUS=listening on {host}:{port}")
        interval = systemd.watchdog_interval()
        if interval:
            self._watchdog = gevent.spawn(self._ping_watchdog, interval)

    def _check_audit(self) -> None:
        if self.audit is None:
            return
        from .audit import AuditError, check_schema

        try:
            check_schema(self.config.audit.url, self.config.source or "FILE")
        except AuditError as exc:
            raise StartupError(str(exc), EXIT_SOFTWARE) from None

    def _metrics_address(self) -> str:
        server = self.metrics.server
        return "%s:%s" % server.address[:2] if server is not None else ""

    def _ping_watchdog(self, interval: float) -> None:
        # Runs on the event loop: if the loop hangs, the pings stop and systemd restarts us.
        while True:
            systemd.notify("WATCHDOG=1")
            gevent.sleep(interval)

    def stop(self, grace: float = STOP_GRACE) -> None:
        systemd.notify("STOPPING=1")
        log.info("stopping: no new calls, up to %gs for calls in progress", grace)
        self.server.stop(grace=grace)
        for watcher in self.watchers:
            watcher.stop()
        self.live.close()
        if self.audit is not None:
            self.audit.stop(AUDIT_FLUSH)
        self.control.stop()
        self.metrics.stop()
        if self._watchdog is not None:
            self._watchdog.kill()
        log.info("stopped")

    # -- signals: enqueue, act in the loop ------------------------------------

    def serve_forever(self, reload: Callable[[], Config] | None = None, reopen_logs: Callable[[], None] = lambda: None):
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            gevent.signal_handler(signum, self._signals.put, signum)
        while True:
            signum = self._signals.get()
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.stop()
                return
            if signum == signal.SIGHUP and reload is not None:
                self.handle_reload(reload)
            elif signum == signal.SIGUSR1:
                reopen_logs()
                log.info("log file reopened")

    def request_stop(self) -> None:
        self._signals.put(signal.SIGTERM)

    def handle_reload(self, reload: Callable[[], Config]) -> bool:
        systemd.notify("RELOADING=1")
        try:
            new = reload()
        except ConfigError as exc:
            log.error("reload refused, the running configuration stays: %s", exc)
            systemd.notify("READY=1")
            return False
        self.apply(new)
        systemd.notify("READY=1")
        return True

    def apply(self, new: Config) -> None:
        """Swap in what can change at run time; calls in progress keep the old policy."""
        old = self.config
        needs_restart = [name for name in RESTART_ONLY if getattr(old, name) != getattr(new, name)]
        self.guard.policy = new.policy
        self.guard.decision_timeout = new.decision_timeout
        self.server.command_timeout = new.command_timeout
        self.server.proxy_header = new.proxy_header
        self.server.accept_from = new.accept_from
        logging.getLogger().setLevel(new.log_level.upper())
        self.config = new
        log.info("configuration reloaded: mode=%s on_error=%s domains=%d", new.policy.mode,
                 new.policy.on_error, len(new.policy.domains))
        if needs_restart:
            log.warning("reload: %s changed; those take effect at the next restart", ", ".join(needs_restart))

    # -- per call ---------------------------------------------------------------

    def _record(self, outcome: CallOutcome) -> None:
        decision = outcome.decision
        if decision is None:
            self.metrics.error("no-verdict")
            return
        verdict = decision.verdict
        self.recent.add(verdict.action, verdict.reason, decision.latency)
        self.metrics.observe(verdict.action, verdict.reason, decision.latency)
        if outcome.error:
            self.metrics.error("after-verdict")
        if self.audit is not None:
            from .audit import AuditRecord

            switch = decision.call.switch_hostname
            self.audit.submit(AuditRecord.from_decision(decision, verdict.mode, switch, datetime.now(UTC)))

    # -- control commands -------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = time.time()
        switches = []
        for switch in self.config.switches:
            watcher = next((w for w in self.watchers if w.name == switch.name), None)
            if watcher is None:
                switches.append({"name": switch.name, "state": "live-lookups", "registrations": 0})
                continue
            info = watcher.status()
            info["last_event_age"] = round(now - info["last_event_at"], 1) if info["last_event_at"] else None
            switches.append(info)
        return {
            "version": __version__,
            "uptime": round(now - self.started_at, 1),
            "mode": str(self.config.policy.mode),
            "on_error": str(self.config.policy.on_error),
            "registrations_source": self.config.registrations,
            "listen": "%s:%s" % self.server.address,
            "switches": switches,
            "decisions": self.recent.summary(),
            "calls_in_progress": len(self.server.pool),
            "refused_connections": sum(self.server.refused.values()),
            "audit": self.audit.stats() if self.audit is not None else None,
        }

    def _status_command(self, _payload: dict[str, Any]) -> dict[str, Any]:
        return {"status": self.status()}

    def check(self, payload: dict[str, Any]) -> dict[str, Any]:
        """What would be decided for this identity and IP right now; no call, no audit row."""
        identity = str(payload.get("identity", ""))
        user, _, domain = identity.partition("@")
        if not user or not domain:
            raise ValueError("identity must be USER@DOMAIN")
        source_ip = str(payload.get("source_ip", ""))
        call = CallFacts(
            uuid="check", source_ip=source_ip, auth_user=user, auth_realm=domain, domain=domain,
            destination=str(payload.get("destination") or ""), from_user=str(payload.get("from_user") or user),
            user_agent=str(payload.get("user_agent") or ""), profile=str(payload.get("profile") or "internal"),
            call_direction=str(payload.get("call_direction") or ""), user_exists=str(payload.get("user_exists") or ""),
        )
        decision: Decision = self.guard.decide(call)
        verdict = decision.verdict
        return {
            "identity": call.identity, "source_ip": source_ip, "destination": call.destination,
            "verdict": str(verdict.action), "reason": str(verdict.reason), "rule": str(verdict.rule),
            "mode": str(verdict.mode), "registered_ips": list(verdict.registered_ips),
            "lookup": decision.lookup, "error": decision.error,
            "latency_ms": round(decision.latency * 1000, 3),
        }


def _audit_writer(config: Config):
    from .audit import AuditError, AuditWriter

    try:
        return AuditWriter(config.audit)  # opens the spool
    except AuditError as exc:
        raise StartupError(f"audit spool: {exc}", EXIT_SOFTWARE) from None


class LogFile:
    """Where the logs go: stderr, or a file that SIGUSR1 reopens (logrotate)."""

    FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

    def __init__(self, path: str, level: str) -> None:
        self.path = path
        handler = logging.FileHandler(path) if path else logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(self.FORMAT))
        root = logging.getLogger()
        for old in list(root.handlers):
            root.removeHandler(old)
        root.addHandler(handler)
        root.setLevel(level.upper())
        self.handler = handler

    def reopen(self) -> None:
        if isinstance(self.handler, logging.FileHandler):
            self.handler.acquire()
            try:
                self.handler.close()
                self.handler.stream = self.handler._open()
            finally:
                self.handler.release()


def configure_logging(level: str, path: str = "") -> LogFile:
    return LogFile(path, level)


def run(config: Config) -> int:
    logs = configure_logging(config.log_level, config.log_file)
    try:
        daemon = Daemon(config)
        daemon.start()
    except StartupError as exc:
        log.error("%s", exc)
        return exc.code
    daemon.serve_forever(reload=lambda: load(config.source), reopen_logs=logs.reopen)
    return EXIT_OK
