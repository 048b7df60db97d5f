"""
ENTG: relays frames between this side's agent and the peer gateway.

Unlike ENG, which exits when either side closes, the gateway keeps running:
a side that drops is replaced by the next one that connects, and while a
side is missing the other is paused, so its frames wait in its socket
instead of being thrown away.
"""

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.logger import Logger

from ent.endpoints import listeningService
from ent.flow import Valve
from ent.protocols.relay import RelayLegFactory
from ent.stats import ServiceStats

OTHER = {"agent": "peer", "peer": "agent"}


class RelayHub:
    """
    Holds at most one leg per side and joins the two with backpressure.
    """

    log = Logger()

    def __init__(self, stats, clock):
        self.stats = stats
        self.drops = stats.drops
        self.clock = clock
        self.legs = {"agent": None, "peer": None}

    def attach(self, leg):
        old = self.legs[leg.side]
        self.legs[leg.side] = leg
        if old is not None:
            self.log.warn(
                "{leg} {peer} replaces {old}", leg=leg.side,
                peer=leg.peerName(), old=old.peerName(),
            )
            old.transport.loseConnection()
        else:
            self.log.info("{leg} connected from {peer}", leg=leg.side, peer=leg.peerName())
        other = self.legs[OTHER[leg.side]]
        if other is None:
            leg.pauseProducing()
            self.log.info("{leg} waits for the {other} side", leg=leg.side, other=OTHER[leg.side])
        else:
            self._join(leg, other)

    @staticmethod
    def feed(leg, source):
        """
        Make C{source} the producer that C{leg}'s transport pauses when its
        buffer is full (C{None}: no producer).
        """
        if leg.feeding is not None:
            leg.transport.unregisterProducer()
            leg.feeding = None
        if source is not None:
            leg.feeding = Valve(source)
            leg.transport.registerProducer(leg.feeding, True)

    def _join(self, a, b):
        self.feed(a, b)
        self.feed(b, a)
        a.resumeProducing()
        b.resumeProducing()
        self.log.info("relaying between agent and peer gateway")

    def detach(self, leg, reason):
        if self.legs[leg.side] is not leg:
            return
        self.legs[leg.side] = None
        self.log.warn(
            "{leg} {peer} disconnected: {reason}", leg=leg.side,
            peer=leg.peerName(), reason=reason.getErrorMessage(),
        )
        other = self.legs[OTHER[leg.side]]
        if other is not None:
            self.feed(other, None)
            other.pauseProducing()

    def closeAll(self):
        """
        Close both legs, neither feeding the other any more.
        """
        for leg in self.legs.values():
            if leg is not None:
                self.feed(leg, None)
                leg.close()

    def forward(self, leg, frames, count):
        target = self.legs[OTHER[leg.side]]
        if target is None:
            self.drops.count("other_side_not_connected", count, leg=leg.side)
            return
        stats = target.legStats
        stats.packetsSent += count
        stats.bytesSent += len(frames)
        target.transport.write(frames)


class GatewayService(MultiService):
    """
    Accepts the agent, and connects to or accepts the peer gateway.
    """

    def __init__(self, agentEndpoint, reactor, peerConnect=None, peerListen=None, stats=None):
        MultiService.__init__(self)
        self.stats = stats if stats is not None else ServiceStats("entg", reactor)
        self.stats.leg("agent")
        self.stats.leg("peer")
        self.drops = self.stats.drops
        self.hub = RelayHub(self.stats, reactor)
        self._listen(agentEndpoint, "agent")
        if peerConnect is not None:
            ClientService(
                peerConnect,
                RelayLegFactory(self.hub, "peer"),
                retryPolicy=backoffPolicy(initialDelay=0.5, maxDelay=10.0),
                clock=reactor,
            ).setServiceParent(self)
        else:
            self._listen(peerListen, "peer")

    def _listen(self, endpoint, side):
        listeningService(endpoint, RelayLegFactory(self.hub, side)).setServiceParent(self)

    def startService(self):
        self.stats.start()
        MultiService.startService(self)

    def stopService(self):
        # Close the legs first: a leg fed by the other would otherwise be
        # kept busy, and its close put off, for as long as traffic flows.
        self.hub.closeAll()
        d = MultiService.stopService(self)
        return d.addBoth(lambda r: (self.stats.stop(), r)[1])
