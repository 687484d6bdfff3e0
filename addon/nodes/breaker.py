"""A node's circuit breaker: closed (in rotation), open (out for a cooldown), then one trial call.

Plain state with explicit times (the caller's clock), so the rules are tested with a fake clock and
the state stays one small object that several relays can later share.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

# 2**60 × any sane base is far past any cap: the bound only keeps the float from overflowing.
_MAX_DOUBLINGS = 60


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """When a breaker opens and for how long: ``threshold`` failures in a row (0: never), then a
    cooldown of ``cooldown`` seconds that doubles with each consecutive opening, up to ``cooldown_max``."""

    threshold: int = 3
    cooldown: float = 30.0
    cooldown_max: float = 600.0

    def cooldown_after(self, openings: int) -> float:
        return min(self.cooldown_max, self.cooldown * 2.0 ** min(openings - 1, _MAX_DOUBLINGS))


@dataclass(slots=True)
class Breaker:
    """One node's breaker state. Every transition holds the lock: the pinger and the admin page
    change it from their own threads while calls change it on the event loop."""

    streak: int = 0  # failures in a row
    openings: int = 0  # consecutive openings without a success between them; 0: closed
    until: float = 0.0  # while open: when the cooldown ends
    trial: object | None = None  # while open: the call holding the one trial, if any
    # A ping success may end one cooldown per open spell: once a trial it brought forward has failed,
    # the ping is no evidence for this node (GET /models answers while POSTs fail).
    ping_may_end: bool = True
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def is_open(self) -> bool:
        return self.openings > 0

    def open(self, now: float, policy: BreakerPolicy) -> None:
        """Open with the first cooldown (a node that was failed when the relay stopped)."""
        with self._lock:
            self.openings, self.until, self.trial, self.ping_may_end = 1, now + policy.cooldown_after(1), None, True

    def claim(self, holder: object, now: float) -> bool:
        """Take the one trial for ``holder`` if the cooldown is over and no trial is out."""
        with self._lock:
            if not self.is_open or self.trial is not None or now < self.until:
                return False
            self.trial = holder
            return True

    def release(self, holder: object) -> None:
        """A trial that ended neither way (client abort): the next call may be the trial."""
        with self._lock:
            if self.trial is holder:
                self.trial = None

    def failure(self, now: float, policy: BreakerPolicy, rest: float = 0.0) -> bool:
        """A failed call. True when it opened the breaker or re-opened it after a failed trial.

        ``rest``: seconds the node asked to be left alone (a 429's ``Retry-After``). Unless the policy never
        opens, such an answer opens the breaker at once, and the wait ends no sooner (nor by a ping).
        """
        with self._lock:
            self.streak += 1
            cooldown = 0.0
            if self.is_open:
                if self.trial is None:  # a call sent before the breaker opened: the cooldown stands
                    self._rest(now, rest)
                    return False
                self.openings += 1
                cooldown = policy.cooldown_after(self.openings)
            elif policy.threshold and self.streak >= policy.threshold:
                self.openings, self.ping_may_end = 1, True
                cooldown = policy.cooldown_after(1)
            elif policy.threshold and rest > 0:
                self.openings, self.ping_may_end = 1, True
            else:
                return False
            self.trial = None
            self.until = now + cooldown
            self._rest(now, rest)
            return True

    def _rest(self, now: float, rest: float) -> None:
        if rest > 0:
            self.until = max(self.until, now + rest)
            self.ping_may_end = False  # the node said how long: an answered ping is no reason to call it sooner

    def close(self) -> bool:
        """A successful call (or an admin reset): back in rotation, streak 0. True when it was open."""
        with self._lock:
            was_open = self.is_open
            self.streak, self.openings, self.until, self.trial, self.ping_may_end = 0, 0, 0.0, None, True
            return was_open

    def ping_answered(self, now: float) -> bool:
        """The node answered its health ping: end the cooldown (once per open spell). True if it did."""
        with self._lock:
            if not self.is_open or not self.ping_may_end or self.until <= now:
                return False
            self.until, self.ping_may_end = now, False
            return True
