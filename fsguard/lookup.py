"""Where a verdict gets registrations: the cache first, live lookups where it cannot know.

* A switch whose watcher is live answers from the cache (a memory lookup).
* A switch whose watcher is down or resyncing answers by a live ``api``
  lookup; if that fails too, the answer lists the error and the verdict
  applies ``on_error`` unless another switch already proved the IP.
* A cache answer that would deny is re-checked live by the Guard
  (``lookup_live``): ``sofia::register`` reaches fsguard 1-20 ms after the
  phone's 200 OK, so a phone that registers and calls at once can beat it.
"""

from __future__ import annotations

from .esl.inbound import LiveLookup
from .esl.watcher import Watcher
from .registrations import LookupFailed, RegistrationCache, Registrations


class CachedLookup:
    def __init__(self, cache: RegistrationCache, watchers: list[Watcher], live: LiveLookup) -> None:
        self.cache = cache
        self.watchers = watchers
        self.live = live
        self._links = {link.name: link for link in live.links}

    def lookup(self, profile: str, user: str, domain: str) -> Registrations:
        identity = f"{user}@{domain}".lower()
        watched = [w.name for w in self.watchers if w.live]
        bindings = self.cache.bindings(identity, watched)
        unwatched = [self._links[w.name] for w in self.watchers if not w.live]
        if not unwatched:
            return Registrations(identity, bindings, "cache")
        try:
            answer = self.live.lookup(profile, user, domain, links=unwatched)
        except LookupFailed as exc:
            if not watched:
                raise
            return Registrations(identity, bindings, "cache", (str(exc),))
        source = "cache+live" if watched else "live"
        return Registrations(identity, bindings + answer.bindings, source, answer.errors)

    def lookup_live(self, profile: str, user: str, domain: str) -> Registrations:
        return self.live.lookup(profile, user, domain)
