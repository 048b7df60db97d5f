"""
Build ENT's services from parsed options; the twistd plugins call these.
"""

from ent.legs.endpoints import clientEndpoint, serverEndpoint
from ent.legs.security import secureClient, secureServer
from ent.services.reload import ReloadOnHangup
from ent.services.startup import FD_RESERVE, _built, guarded, legsWithinFileLimit, raiseFileLimit


def _handshakeBudget(options):
    """
    --handshake-timeout for the TLS legs, whose protocol enforces it.
    """
    from ent.protocols.framed import FramedLeg

    FramedLeg.handshakeTimeout = options.get("handshake-timeout", FramedLeg.handshakeTimeout)


def makeAgentService(options, reactor):
    from ent.observability.stats import ServiceStats
    from ent.services.agent import AgentService

    def build():
        _handshakeBudget(options)
        stats = ServiceStats("enta", reactor)
        endpoint = secureClient(
            reactor,
            clientEndpoint(reactor, options["entg-connect"], "--entg-connect"),
            options["entg-security"],
            options["entg-connect"],
            leg="gateway",
            stats=stats,
        )
        agent = AgentService(options, endpoint, reactor, stats, hangup=ReloadOnHangup(reactor))
        if options["entg-security"].kind == "rats-tls" and options.get("policy-rules") is None:
            agent.log.warn(
                "rats-tls leg without --policy: the gateway's evidence is checked only by the --verifier plugin, "
                "whatever it measures (docs/security.md)"
            )
        return guarded("enta", agent, options, reactor)

    return _built("enta", build)


def makeGatewayService(options, reactor):
    from ent.observability.stats import ServiceStats
    from ent.protocols.limits import LegLimits
    from ent.services.gateway import GatewayService

    def build():
        _handshakeBudget(options)
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
        fileLimit = raiseFileLimit()
        maxLegs = legsWithinFileLimit(options["max-legs"], fileLimit)
        limits = LegLimits(
            reactor,
            stats.legRefused,
            maxLegs=maxLegs,
            perSource=options["max-legs-per-source"],
            budget=options.get("handshake-timeout", 10.0),
        )
        securities = [options["enta-security"], options["entg-listen-security"]]
        securities += [peer.security for peer in options["entg-peers"]]
        service = GatewayService(
            agentListen,
            reactor,
            peers=peers,
            peerListen=peerListen,
            stats=stats,
            allowedIps=options["allowed-ips"],
            agentToAgent=bool(options["agent-to-agent"]),
            policy=options.get("policy-rules"),
            reattest=options.get("reattest", 0),
            ratsTls=any(s is not None and s.kind == "rats-tls" for s in securities),
            hangup=ReloadOnHangup(reactor),
            limits=limits,
        )
        if maxLegs < options["max-legs"]:
            service.log.warn(
                "--max-legs {wanted} lowered to {legs}: this process may open {limit} files, "
                "{reserve} of them kept for peers, metrics and logs",
                wanted=options["max-legs"],
                legs=maxLegs,
                limit=fileLimit,
                reserve=FD_RESERVE,
            )
        return guarded("entg", service, options, reactor)

    return _built("entg", build)
