"""Deciding one call: registration lookup under a deadline, then the verdict.

This is the only place where the pure verdict meets I/O.  Whatever goes
wrong on the way (switch silent, garbage, a bug) ends in a verdict with a
reason, never in an exception that would leave the call undecided.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import gevent

from .call import CallFacts
from .policy import Policy, Reason, Unchecked, Verdict, decide, needs_registrations
from .registrations import LookupFailed, RegistrationSource, Registrations

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Decision:
    call: CallFacts
    verdict: Verdict
    lookup: str  # "live", "cache", or "none" when no lookup was needed or it failed
    latency: float  # seconds spent deciding
    error: str = ""


class Guard:
    def __init__(
        self,
        policy: Policy,
        registrations: RegistrationSource,
        decision_timeout: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.policy = policy
        self.registrations = registrations
        self.decision_timeout = decision_timeout
        self.clock = clock

    def decide(self, call: CallFacts, may_look_up: bool = True) -> Decision:
        """Decide ``call``; with ``may_look_up`` False (over capacity) a call that
        needs registrations gets the ``over_capacity`` verdict instead of waiting."""
        started = time.perf_counter()
        policy = self.policy  # one policy per decision, even if a reload swaps it meanwhile
        answer: Registrations | Unchecked | None = None
        verdict: Verdict | None = None
        error = ""
        needed = needs_registrations(call, policy, self.clock())
        if needed and not may_look_up:
            answer, error = Unchecked.OVER_CAPACITY, "too many calls in progress"
        elif needed:
            try:
                with gevent.Timeout(self.decision_timeout):
                    answer, error = self._lookup(call)
                    verdict = decide(call, answer, policy, self.clock())
                    if self._needs_live_check(verdict, answer):
                        verdict = None
                        answer, error = self._lookup(call, live=True, fallback=answer)
            except gevent.Timeout:
                verdict = None
                answer, error = Unchecked.TIMEOUT, f"no answer within decision_timeout={self.decision_timeout:g}s"
        if verdict is None:
            verdict = decide(call, answer, policy, self.clock())
        lookup = answer.source if isinstance(answer, Registrations) else "none"
        return Decision(call, verdict, lookup, time.perf_counter() - started, error)

    @staticmethod
    def _needs_live_check(verdict: Verdict, answer: Registrations | Unchecked) -> bool:
        """A deny from the cache is confirmed live: the phone may have just registered."""
        return (
            isinstance(answer, Registrations)
            and answer.source != "live"
            and verdict.rule in (Reason.NOT_REGISTERED, Reason.IP_NOT_REGISTERED)
        )

    def _lookup(
        self, call: CallFacts, live: bool = False, fallback: Registrations | None = None
    ) -> tuple[Registrations | Unchecked, str]:
        ask = self.registrations.lookup_live if live else self.registrations.lookup
        try:
            return ask(call.profile, call.auth_user, call.auth_realm), ""
        except LookupFailed as exc:
            error = str(exc)
        except gevent.Timeout:
            raise
        except Exception as exc:  # a bug must still end in a verdict
            log.exception("registration lookup crashed for call %s", call.uuid)
            error = f"internal error: {exc!r}"
        # The cache did answer; a failed confirmation leaves its answer standing.
        return (fallback if fallback is not None else Unchecked.LOOKUP_FAILED), error
