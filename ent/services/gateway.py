"""
ENTG: relays frames between this side's agents and the peer gateways;
L{ent.protocols.router} decides which leg each frame goes to.

Unlike ENG, which exits when either side closes, the gateway keeps running:
legs come and go, and while one side has no leg the other side's legs are
paused, so their frames wait in their sockets instead of being thrown away.
"""

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.logger import Logger

from ent.legs.endpoints import listeningService
from ent.legs.policy import allowedIpsPolicy
from ent.observability.stats import ServiceStats
from ent.protocols.admission import Admission
from ent.protocols.reattest import QuickRetry, Reattestation
from ent.protocols.relay import RelayLegFactory
from ent.protocols.router import Router


class GatewayService(MultiService):
    """
    Accepts agents, and connects to or accepts peer gateways.
    """

    log = Logger()

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
        policy=None,
        reattest=0,
        ratsTls=False,
        hangup=None,
        limits=None,
    ):
        """
        C{peers}: C{(endpoint, prefixes)} for each peer gateway to connect
        to, its prefixes the tunnel addresses behind it; C{peerConnect} is
        the one peer of old, behind which is everything.  C{policy}: the
        L{ent.legs.policy.Policy} every leg must match, or C{None};
        C{reattest}: C{--reattest} in seconds; C{ratsTls}: whether any leg
        is on rats-tls (without a policy, a warning says that no evidence
        is checked); C{hangup}: installs the SIGHUP handler that reloads
        the policy (L{ReloadOnHangup}), given by the plugin only;
        C{limits}: the L{ent.protocols.limits.LegLimits} of the accepted
        legs (none without it).
        """
        MultiService.__init__(self)
        self.stats = stats if stats is not None else ServiceStats("entg", reactor)
        self.stats.leg("agent")
        self.stats.leg("peer")
        self.drops = self.stats.drops
        peers = list(peers)
        if peerConnect is not None:
            peers.insert(0, (peerConnect, ()))
        self.ratsTls = ratsTls
        if policy is None and allowedIps:
            policy = allowedIpsPolicy(allowedIps)
        self.admission = Admission(policy, reactor, self.stats.legRefused)
        self.hub = Router(
            self.stats,
            reactor,
            agentToAgent=agentToAgent,
            peerRoutes=[p for _, routes in peers for p in routes],
            admission=self.admission,
            reattest=Reattestation(reactor, reattest, self.stats.reattested),
        )
        self.hangup = hangup
        self.limits = limits
        self._listen(agentEndpoint, "agent")
        for endpoint, routes in peers:
            # One service per peer: each reconnects on its own, at once
            # after closing its leg for re-attestation.
            retry = QuickRetry(backoffPolicy(initialDelay=0.5, maxDelay=10.0))
            ClientService(
                endpoint,
                RelayLegFactory(self.hub, "peer", routes, connecting=True, retry=retry),
                retryPolicy=retry,
                clock=reactor,
            ).setServiceParent(self)
        if peerListen is not None:
            self._listen(peerListen, "peer")

    def _listen(self, endpoint, side):
        listeningService(endpoint, RelayLegFactory(self.hub, side, limits=self.limits)).setServiceParent(self)

    def reloadPolicy(self):
        """
        SIGHUP: re-read the policy, then close every leg it no longer
        admits as it was; a wrong file changes nothing.
        """
        if not self.admission.active or self.admission.policy.path is None:
            self.log.warn("SIGHUP: no --policy to reload")
            return 0
        if not self.admission.reload():
            return 0
        return self.hub.recheck()

    def startService(self):
        self.stats.start()
        if self.ratsTls and not (self.admission.active and self.admission.policy.strict):
            self.log.warn(
                "rats-tls legs without --policy: no party's evidence is checked, anyone who reaches "
                "a port may join (docs/security.md)"
            )
        if self.admission.active and self.admission.policy.strict and self.admission.policy.isEmpty():
            self.log.warn(
                "the --policy {path} names no identity: every leg is refused", path=self.admission.policy.path
            )
        if self.hangup is not None:
            self.hangup.start(self.reloadPolicy)
        MultiService.startService(self)

    def stopService(self):
        if self.hangup is not None:
            self.hangup.stop()
        # Close the legs first: a leg fed by the other would otherwise be
        # kept busy, and its close put off, for as long as traffic flows.
        self.hub.closeAll()
        d = MultiService.stopService(self)
        return d.addBoth(lambda r: (self.stats.stop(), r)[1])
