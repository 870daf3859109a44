"""Registration watcher: one per switch, keeps its part of the cache current.

On every (re)connect: subscribe to the sofia events, load every profile's
registrations (``sofia xmlstatus`` lists profiles, ``sofia xmlstatus profile
<p> reg`` their rows), swap the switch's table in whole, then apply the
events that arrived meanwhile, in order.  Registrations survive a FreeSWITCH
restart and shutdown sends no unregister events, so a resync after every
reconnect is the only way to the truth.  Events come as JSON: every value a
plain string, no URL-decoding, cheaper to parse (and invalid UTF-8 is
replaced, see protocol.parse_json_event).

While a watcher is not ``live`` its switch is answered by live lookups
(fsguard.lookup.CachedLookup), never from a table that may be stale.
"""

from __future__ import annotations

import gc
import logging
import random
import time
from collections import Counter
from collections.abc import Callable

import gevent
from gevent.event import Event as Flag
from greenswitch.esl import NotConnectedError

from ..config import SwitchConfig
from ..registrations import (
    WATCHED_EVENTS,
    Binding,
    LookupFailed,
    RegistrationCache,
    SwitchTable,
    change_from_event,
    parse_profiles,
    parse_xmlstatus,
)
from .inbound import SwitchClient
from .protocol import Event, ProtocolError

log = logging.getLogger(__name__)

SUBSCRIBED = "CUSTOM " + " ".join(sorted(WATCHED_EVENTS))
BOOTSTRAP_TIMEOUT = 60.0  # a profile with 100k rows answers in seconds, not milliseconds


class Watcher:
    def __init__(
        self,
        config: SwitchConfig,
        cache: RegistrationCache,
        timeout: float,
        expiry_margin: float,
        clock: Callable[[], float] = time.time,
        backoff: tuple[float, float] = (0.5, 30.0),
        sweep_interval: float = 30.0,
        event_format: str = "json",
    ) -> None:
        self.config = config
        self.cache = cache
        self.timeout = timeout
        self.expiry_margin = expiry_margin
        self.clock = clock
        self.backoff_min, self.backoff_max = backoff
        self.sweep_interval = sweep_interval
        self.event_format = event_format  # "plain" works too; json is cheaper to parse
        self._waiting = 0
        self.state = "down"  # down, connecting, syncing, live, stopped
        self.last_error = ""
        self.last_event_at: float | None = None
        self.synced_at: float | None = None
        self.sessions = 0
        self.events: Counter[str] = Counter()
        self.synced = Flag()  # set whenever a sync completes (tests wait on it)
        self._frozen = False  # gc.freeze() done after the first bootstrap
        self._changed = Flag()
        self._stopped = Flag()
        self._client: SwitchClient | None = None
        self._greenlet: gevent.Greenlet | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def live(self) -> bool:
        return self.state == "live"

    def start(self) -> None:
        self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        self._stopped.set()
        if self._client is not None:
            self._client.close()
        if self._greenlet is not None:
            self._greenlet.kill(block=True, timeout=self.timeout)
        self._set_state("stopped")

    def _run(self) -> None:
        delay = self.backoff_min
        while not self._stopped.is_set():
            started = time.monotonic()
            try:
                self._session()
            except (NotConnectedError, LookupFailed, ProtocolError, OSError) as exc:
                self._went_down(str(exc))
            except Exception as exc:
                log.exception("switch=%s watcher failed", self.name)
                self._went_down(f"internal error: {exc!r}")
            if time.monotonic() - started > self.backoff_max:
                delay = self.backoff_min  # it had been up for a while: retry soon
            # Jitter: switches of a cluster restarted together are not hit in step.
            self._stopped.wait(random.uniform(delay / 2, delay))
            delay = min(delay * 2, self.backoff_max)

    def _went_down(self, reason: str) -> None:
        # One line per fault, not one per reconnect attempt.
        was_up = self.state in ("syncing", "live")
        level = logging.WARNING if was_up or reason != self.last_error else logging.DEBUG
        log.log(level, "switch=%s watcher down (was %s): %s; live lookups answer for it", self.name, self.state, reason)
        self.last_error = reason
        self._set_state("down")

    def _session(self) -> None:
        self._set_state("connecting")
        client = SwitchClient(self.config.host, self.config.port, self.config.password, self.timeout)
        self._client = client
        client.connect()
        self.sessions += 1
        pending: list[Event] | None = []

        def on_event(event: Event) -> None:
            if pending is not None:
                pending.append(event)
            else:
                self._apply(event)

        for name in WATCHED_EVENTS:
            client.register_handle(name, on_event)
        reply = client.send(f"event {self.event_format} {SUBSCRIBED}")
        if not reply.reply_text.startswith("+OK"):
            raise NotConnectedError(f"event subscription refused: {reply.reply_text}")
        self._set_state("syncing")
        table = SwitchTable(self._snapshot(client))
        self.cache.replace(self.name, table)
        if not self._frozen:
            # The first table is built at start-up and lives until the next bootstrap: out of the
            # cyclic GC's sight, a full collection no longer walks every binding (100 ms pauses of
            # every call with 10k of them, outbound benchmark).  Bindings hold no reference cycles,
            # so a replaced table is still freed by refcounting.  Only once: what else is alive at a
            # later bootstrap (calls in progress) could hold cycles that would then never be freed.
            gc.freeze()
            self._frozen = True
        for event in pending:
            self._apply(event)
        pending = None
        self.synced_at = self.clock()
        self._set_state("live")
        self.synced.set()
        log.info("switch=%s watcher live: %d registrations", self.name, len(table))
        self._watch(client)
        raise NotConnectedError(client.close_reason or "connection lost")

    def _set_state(self, state: str) -> None:
        self.state = state
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, Flag()
        changed.set()

    def wait_for(self, predicate: Callable[["Watcher"], bool], timeout: float) -> bool:
        """Wait until ``predicate(self)`` holds, re-checked at every state change and event."""
        deadline = time.monotonic() + timeout
        self._waiting += 1
        try:
            while not predicate(self):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
            return True
        finally:
            self._waiting -= 1

    def _snapshot(self, client: SwitchClient) -> list[Binding]:
        profiles = parse_profiles(self._api(client, "sofia xmlstatus"))
        bindings: list[Binding] = []
        for profile in profiles:
            reply = self._api(client, f"sofia xmlstatus profile {profile} reg", BOOTSTRAP_TIMEOUT)
            bindings.extend(parse_xmlstatus(reply, self.clock(), profile=profile, switch=self.name))
        return bindings

    def _api(self, client: SwitchClient, command: str, timeout: float | None = None) -> bytes:
        reply = client.api(command, timeout)
        if reply.content_type != "api/response":
            raise LookupFailed(f"unexpected reply to {command!r}: {reply.content_type!r}")
        return reply.body

    def _watch(self, client: SwitchClient) -> None:
        reader = client._receive_events_greenlet  # greenswitch's reader: ends when the connection does
        while not reader.ready():
            reader.join(timeout=self.sweep_interval)
            table = self.cache.tables.get(self.name)
            if table is not None and table.sweep(self.clock()) and self._waiting:
                self._notify()

    def _apply(self, event: Event) -> None:
        self.events[event.subclass] += 1
        self.last_event_at = self.clock()
        change = change_from_event(event.headers, self.name, self.last_event_at, self.expiry_margin)
        if change is not None:
            self.cache.apply(self.name, change)
        if self._waiting:
            self._notify()

    def status(self) -> dict:
        return {
            "name": self.name,
            "state": self.state,
            "registrations": self.cache.size(self.name),
            "last_event_at": self.last_event_at,
            "synced_at": self.synced_at,
            "sessions": self.sessions,
            "last_error": self.last_error,
            "events": dict(self.events),
        }
