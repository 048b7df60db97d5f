"""
How many legs a gateway holds, in total and per source address.

Whoever reaches a gateway's port can open connections; each costs a file
descriptor and memory. So accepted legs are counted, and a connection
beyond C{--max-legs} or C{--max-legs-per-source} is refused at accept
(counted in C{ent_legs_refused_total{reason=...}}).

A flood must not lock out a real agent: a leg is I{unproven} until it
completes a frame, or a handshake that authenticated its peer. When a new
connection meets a full limit, the oldest unproven leg under that limit is
closed to make room, so only legs that have shown they speak the protocol
can hold their places; only when every leg under the limit is proven is
the new one refused. Unproven legs older than the handshake budget are
also closed while the gateway is under pressure (more than half of a limit
in use): idle connections that never sent a frame are what a flood is
made of, while an idle agent of ENG's that keeps quiet is left alone when
there is room.
"""

from collections import Counter, OrderedDict

from twisted.logger import Logger

from ent.ratelimit import OncePer

DEFAULT_MAX_LEGS = 4096
DEFAULT_MAX_LEGS_PER_SOURCE = 64


def sourceOf(address):
    return getattr(address, "host", None)


class LegLimits:
    """
    The accounting of one gateway's accepted legs.

    C{refused} is called with C{(leg, reason)} for each connection refused
    or closed for a limit, to count it.
    """

    log = Logger()

    def __init__(self, clock, refused, maxLegs=DEFAULT_MAX_LEGS, perSource=DEFAULT_MAX_LEGS_PER_SOURCE, budget=10.0):
        self.clock = clock
        self.refused = refused
        self.maxLegs = maxLegs
        self.perSource = perSource
        self.budget = budget
        self.total = 0
        self.bySource = Counter()
        # Unproven legs, oldest first: all of them, and by source.
        self.unproven = OrderedDict()
        self.unprovenBySource = {}
        self._sources = {}
        self._timers = {}
        self._logAllowed = OncePer(clock)

    def admit(self, side, address):
        """
        Whether a new connection from C{address} may be taken, after making
        room by closing an unproven leg if a limit is full.
        """
        source = sourceOf(address)
        if self.bySource[source] >= self.perSource and not self._evictOldest(self.unprovenBySource.get(source)):
            self._refuse(side, source, "max_legs_per_source")
            return False
        if self.total >= self.maxLegs and not self._evictOldest(self.unproven):
            self._refuse(side, source, "max_legs")
            return False
        return True

    def opened(self, leg, address):
        source = sourceOf(address)
        self.total += 1
        self.bySource[source] += 1
        self._sources[leg] = source
        self.unproven[leg] = source
        self.unprovenBySource.setdefault(source, OrderedDict())[leg] = None
        self._timers[leg] = self.clock.callLater(self.budget, self._expire, leg)

    def proven(self, leg):
        """
        C{leg} completed a frame or an authenticating handshake.
        """
        source = self.unproven.pop(leg, None)
        if source is None and leg not in self._sources:
            return
        self._unlistUnproven(leg, self._sources.get(leg))
        timer = self._timers.pop(leg, None)
        if timer is not None and timer.active():
            timer.cancel()

    def closed(self, leg):
        if leg not in self._sources:
            return
        self.proven(leg)
        source = self._sources.pop(leg)
        self.total -= 1
        self.bySource[source] -= 1
        if not self.bySource[source]:
            del self.bySource[source]

    def isProven(self, leg):
        return leg in self._sources and leg not in self.unproven

    def underPressure(self, source):
        return self.total > self.maxLegs // 2 or self.bySource[source] > self.perSource // 2

    def _unlistUnproven(self, leg, source):
        self.unproven.pop(leg, None)
        bySource = self.unprovenBySource.get(source)
        if bySource is not None:
            bySource.pop(leg, None)
            if not bySource:
                del self.unprovenBySource[source]

    def _expire(self, leg):
        self._timers.pop(leg, None)
        source = self.unproven.get(leg)
        if source is None and leg not in self.unproven:
            return
        if self.underPressure(source):
            self._close(leg, "unproven_timeout")

    def _evictOldest(self, legs):
        if not legs:
            return False
        self._close(next(iter(legs)), "unproven_evicted")
        return True

    def _close(self, leg, reason):
        """
        Close an unproven leg to make room; it is forgotten at once, so its
        place is free before its connection is gone.
        """
        source = self._sources.get(leg)
        self.closed(leg)
        self.refused(leg.side, reason)
        if self._logAllowed((source, reason, "closed")):
            self.log.warn(
                "{leg} {peer} closed before it sent a frame or authenticated: {why} "
                "(logged at most once a minute per source)",
                leg=leg.side,
                peer=leg.peerName(),
                why=_WHY[reason],
                reason=reason,
            )
        leg.evict()

    def _refuse(self, side, source, reason):
        self.refused(side, reason)
        if self._logAllowed((source, reason)):
            self.log.warn(
                "{leg} connection from {source} refused: {why} (logged at most once a minute per source)",
                leg=side,
                source=source,
                why=_WHY[reason],
                reason=reason,
            )


_WHY = {
    "max_legs": "the gateway holds --max-legs legs, each of which has sent a frame or authenticated",
    "max_legs_per_source": "its address holds --max-legs-per-source legs, each of which has sent a frame or authenticated",
    "unproven_evicted": "the oldest such leg, to make room for a new connection at a full limit",
    "unproven_timeout": "nothing within the handshake budget while the gateway is under pressure",
}
