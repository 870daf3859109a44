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
from .policy import Policy, Unchecked, Verdict, decide, needs_registrations
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

    def decide(self, call: CallFacts) -> Decision:
        started = time.perf_counter()
        answer: Registrations | Unchecked | None = None
        error = ""
        if needs_registrations(call, self.policy):
            answer, error = self._lookup(call)
        verdict = decide(call, answer, self.policy, self.clock())
        lookup = answer.source if isinstance(answer, Registrations) else "none"
        return Decision(call, verdict, lookup, time.perf_counter() - started, error)

    def _lookup(self, call: CallFacts) -> tuple[Registrations | Unchecked, str]:
        try:
            with gevent.Timeout(self.decision_timeout):
                return self.registrations.lookup(call.profile, call.auth_user, call.auth_realm), ""
        except gevent.Timeout:
            return Unchecked.TIMEOUT, f"no answer within decision_timeout={self.decision_timeout:g}s"
        except LookupFailed as exc:
            return Unchecked.LOOKUP_FAILED, str(exc)
        except Exception as exc:  # a bug must still end in the on_error verdict
            log.exception("registration lookup crashed for call %s", call.uuid)
            return Unchecked.LOOKUP_FAILED, f"internal error: {exc!r}"
