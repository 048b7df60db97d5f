"""
ENTG: relays frames between this side's agents and the peer gateways;
L{ent.protocols.router} decides which leg each frame goes to.

Unlike ENG, which exits when either side closes, the gateway keeps running:
legs come and go, and while one side has no leg the other side's legs are
paused, so their frames wait in their sockets instead of being thrown away.
"""

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService

from ent.legs.endpoints import listeningService
from ent.observability.stats import ServiceStats
from ent.protocols.relay import RelayLegFactory
from ent.protocols.router import Router


class GatewayService(MultiService):
    """
    Accepts agents, and connects to or accepts peer gateways.
    """

    def __init__(
        self,
        agentEndpoint,
        reactor,
        peerConnect=None,
        peerListen=None,
        stats=None,
        allowedIps=None,
        agentToAgent=False,
        peers=(),
    ):
        """
        C{peers}: C{(endpoint, prefixes)} for each peer gateway to connect
        to, its prefixes the tunnel addresses behind it; C{peerConnect} is
        the one peer of old, behind which is everything.
        """
        MultiService.__init__(self)
        self.stats = stats if stats is not None else ServiceStats("entg", reactor)
        self.stats.leg("agent")
        self.stats.leg("peer")
        self.drops = self.stats.drops
        peers = list(peers)
        if peerConnect is not None:
            peers.insert(0, (peerConnect, ()))
        self.hub = Router(
            self.stats,
            reactor,
            allowedIps=allowedIps,
            agentToAgent=agentToAgent,
            peerRoutes=[p for _, routes in peers for p in routes],
        )
        self._listen(agentEndpoint, "agent")
        for endpoint, routes in peers:
            # One service per peer: each reconnects on its own.
            ClientService(
                endpoint,
                RelayLegFactory(self.hub, "peer", routes),
                retryPolicy=backoffPolicy(initialDelay=0.5, maxDelay=10.0),
                clock=reactor,
            ).setServiceParent(self)
        if peerListen is not None:
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
