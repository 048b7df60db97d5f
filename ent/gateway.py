"""
ENTG: relays frames between this side's agents and the peer gateways;
L{ent.router} decides which leg each frame goes to.

Unlike ENG, which exits when either side closes, the gateway keeps running:
legs come and go, and while one side has no leg the other side's legs are
paused, so their frames wait in their sockets instead of being thrown away.
"""

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService

from ent.endpoints import listeningService
from ent.protocols.relay import RelayLegFactory
from ent.router import Router
from ent.stats import ServiceStats

# The name the gateway's hub had when it joined exactly two legs.
RelayHub = Router


class GatewayService(MultiService):
    """
    Accepts agents, and connects to or accepts peer gateways.
    """

    def __init__(self, agentEndpoint, reactor, peerConnect=None, peerListen=None, stats=None,
                 allowedIps=None, agentToAgent=False):
        MultiService.__init__(self)
        self.stats = stats if stats is not None else ServiceStats("entg", reactor)
        self.stats.leg("agent")
        self.stats.leg("peer")
        self.drops = self.stats.drops
        self.hub = Router(self.stats, reactor, allowedIps=allowedIps, agentToAgent=agentToAgent)
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
