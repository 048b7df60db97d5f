"""
Build ENT's services from parsed options; the twistd plugins call these.
"""

from ent.legs.endpoints import clientEndpoint, serverEndpoint
from ent.legs.security import secureClient, secureServer
from ent.services.startup import _built, guarded


def makeAgentService(options, reactor):
    from ent.observability.stats import ServiceStats
    from ent.services.agent import AgentService

    def build():
        stats = ServiceStats("enta", reactor)
        endpoint = secureClient(
            reactor,
            clientEndpoint(reactor, options["entg-connect"], "--entg-connect"),
            options["entg-security"],
            options["entg-connect"],
            leg="gateway",
            stats=stats,
        )
        return guarded("enta", AgentService(options, endpoint, reactor, stats), options, reactor)

    return _built("enta", build)


def makeGatewayService(options, reactor):
    from ent.observability.stats import ServiceStats
    from ent.services.gateway import GatewayService

    def build():
        stats = ServiceStats("entg", reactor)
        peers = [
            (
                secureClient(
                    reactor,
                    clientEndpoint(reactor, peer.description, "--entg-connect"),
                    peer.security,
                    peer.description,
                    leg="peer",
                    stats=stats,
                ),
                peer.routes,
            )
            for peer in options["entg-peers"]
        ]
        peerListen = None
        if options["entg-listen"] is not None:
            peerListen = secureServer(
                reactor,
                serverEndpoint(reactor, options["entg-listen"], "--entg-listen"),
                options["entg-listen-security"],
                options["entg-listen"],
                leg="peer",
                stats=stats,
            )
        agentListen = secureServer(
            reactor,
            serverEndpoint(reactor, options["enta-listen"], "--enta-listen"),
            options["enta-security"],
            options["enta-listen"],
            leg="agent",
            stats=stats,
        )
        service = GatewayService(
            agentListen,
            reactor,
            peers=peers,
            peerListen=peerListen,
            stats=stats,
            allowedIps=options["allowed-ips"],
            agentToAgent=bool(options["agent-to-agent"]),
        )
        return guarded("entg", service, options, reactor)

    return _built("entg", build)
