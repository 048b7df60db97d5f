"""
The gateway's legs: frames from one leg are relayed, still framed, to the
leg the router picks. Only whole frames are passed on, so a leg that drops
mid-frame cannot corrupt the stream of the others.
"""

import socket

from twisted.internet.interfaces import ISystemHandle
from twisted.internet.protocol import Factory

from ent.legs.identity import peerIdentities
from ent.legs.policy import Refusal
from ent.protocols.admission import describeEvidence, legFacts
from ent.protocols.framed import FramedLeg

# A leg whose peer vanished without a close (host down, path cut) holds its
# addresses until it is known dead; keepalive finds out after about
# KEEPALIVE_IDLE + KEEPALIVE_COUNT * KEEPALIVE_INTERVAL seconds of silence.
KEEPALIVE_IDLE = 10
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3


def keepAlive(transport):
    """
    Probe an idle TCP leg, so a dead peer's leg is closed and its addresses
    freed for the agent's next connection.
    """
    if not ISystemHandle.providedBy(transport):
        return
    try:
        handle = transport.getHandle()
        handle.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        handle.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        handle.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        handle.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
    except (OSError, AttributeError):
        pass  # not a TCP socket (unix, vsock)


class RelayLeg(FramedLeg):
    """
    One leg of the gateway: C{side} is C{"agent"} or C{"peer"}; the router
    keeps what it knows of the leg on it (gate, holds, addresses).
    """

    relay = True
    refused = False
    # The policy's identity this leg was admitted as (None without a
    # policy), and what it was admitted on.
    identity = None
    facts = None
    reattestation = None
    reattesting = False
    # From the identity: whom it may reach (an Identity with services), and
    # for a peer the prefixes its frames must come from; None: no limit.
    services = None
    sourcePrefixes = None
    # The gateway's L{ent.protocols.limits.LegLimits} for an accepted leg;
    # unproven until it completes a frame or an authenticating handshake.
    limits = None
    unproven = False

    def __init__(self, hub, side, routes=(), connecting=False, retry=None):
        self.side = side
        self.leg = side
        FramedLeg.__init__(self, hub.stats, hub.clock)
        # The router routes a batch of alike frames at once.
        self.decoder.trackPairs = True
        self.hub = hub
        # The prefixes this leg's --entg-connect routes to it, if any.
        self.routes = tuple(routes)
        # Whether this gateway connected the leg (a peer of --entg-connect).
        self.connecting = connecting
        # Its ClientService's retry policy (L{ent.protocols.reattest.QuickRetry}).
        self.retry = retry
        self.gate = None
        self.holds = set()
        self.owned = set()
        self.prefixes = ()
        self.identities = ()
        # Where this leg's frames went, by their addresses (source and
        # destination, concatenated), while the router's generation holds.
        self.routeCache = {}
        self.routeGeneration = None
        self.since = None
        self.packetsReceived = self.bytesReceived = 0
        self.packetsSent = self.bytesSent = 0

    def identityText(self):
        if self.identity is not None:
            return self.identity.name
        return ", ".join(self.identities) if self.identities else "-"

    def identityShort(self):
        """
        The first name, and how many more: a certificate may carry several.
        """
        if len(self.identities) > 1:
            return f"{self.identities[0]} (+{len(self.identities) - 1})"
        return self.identityText()

    def identitySuffix(self):
        return f" ({self.identityText()})" if self.identities or self.identity is not None else ""

    def evidenceText(self):
        return describeEvidence(self.facts)

    def legUp(self):
        keepAlive(self.transport)
        self.since = self.clock.seconds()
        self.identities = peerIdentities(self.transport)
        self.facts = legFacts(self.transport, self.side)
        if self.unproven and self.facts.kind != "tcp":
            self._proven()
        admission = self.hub.admission
        if admission is not None and admission.active:
            result = admission.admit(self.facts, self.side, self.peerName())
            if isinstance(result, Refusal):
                # Never attached: it routes nothing and owns nothing.
                self.refuseUnattached()
                return
            self.identity = result
        if self.hub.reattest is not None:
            self.reattestation = self.hub.reattest.watch(self)
        self.hub.attach(self)

    def _proven(self):
        self.unproven = False
        self.limits.proven(self)
        if self.hub.attached(self):
            self.hub.connectedLine(self)

    def evict(self):
        """
        Close this leg at once to make room (L{ent.protocols.limits}).
        """
        if self.hub.attached(self):
            self.hub.evict(self)
        else:
            self.refused = True
            self.transport.abortConnection()

    def connectionLost(self, reason):
        FramedLeg.connectionLost(self, reason)
        if self.limits is not None:
            self.limits.closed(self)

    def framedDataReceived(self, frames, count):
        if self.unproven:
            self._proven()
        self.packetsReceived += count
        self.bytesReceived += len(frames)
        self.hub.forward(self, frames, count, self.decoder.pair)

    def legDown(self, reason):
        if self.reattestation is not None:
            self.reattestation.cancel()
            self.reattestation = None
        self.hub.detach(self, reason)


class RelayLegFactory(Factory):
    noisy = False

    def __init__(self, hub, side, routes=(), connecting=False, retry=None, limits=None):
        self.hub = hub
        self.side = side
        self.routes = tuple(routes)
        self.connecting = connecting
        self.retry = retry
        self.limits = limits

    def buildProtocol(self, addr):
        limits = self.limits
        if limits is not None and not limits.admit(self.side, addr):
            return None  # the port closes the connection
        leg = RelayLeg(self.hub, self.side, self.routes, self.connecting, self.retry)
        if limits is not None:
            leg.limits = limits
            leg.unproven = True
            limits.opened(leg, addr)
        return leg
