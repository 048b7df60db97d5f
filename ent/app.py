"""
Build ENT's services from parsed options; the twistd plugins call these.
"""

from twisted.application.service import MultiService
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from ent.endpoints import clientEndpoint, serverEndpoint
from ent.errors import EntError
from ent.legs import secureClient, secureServer


class StartupGuard(MultiService):
    """
    Turn a failed start into a one-line message and a non-zero exit.

    The child has already undone what it configured; a traceback would only
    hide the reason from the operator.
    """

    log = Logger()

    def __init__(self, name, child):
        MultiService.__init__(self)
        self.name = name
        child.setServiceParent(self)

    def _guarded(self, start):
        try:
            start(self)
        except (EntError, CannotListenError) as e:
            self.running = 0
            self.log.critical("{name}: cannot start: {error}", name=self.name, error=str(e))
            raise SystemExit(f"{self.name}: cannot start: {e}")

    def privilegedStartService(self):
        self._guarded(MultiService.privilegedStartService)

    def startService(self):
        self._guarded(MultiService.startService)


def _built(name, build):
    try:
        return build()
    except EntError as e:
        raise SystemExit(f"twistd {name}: {e}")


def makeAgentService(options, reactor):
    from ent.agent import AgentService

    def build():
        endpoint = secureClient(
            reactor, clientEndpoint(reactor, options["entg-connect"]), options["entg-security"],
            options["entg-connect"],
        )
        return StartupGuard("enta", AgentService(options, endpoint, reactor))

    return _built("enta", build)


def makeGatewayService(options, reactor):
    from ent.gateway import GatewayService

    def build():
        peerConnect = peerListen = None
        peerSecurity = options["entg-security"]
        if options["entg-connect"] is not None:
            peerConnect = secureClient(
                reactor, clientEndpoint(reactor, options["entg-connect"]), peerSecurity,
                options["entg-connect"],
            )
        else:
            peerListen = secureServer(
                reactor, serverEndpoint(reactor, options["entg-listen"]), peerSecurity,
                options["entg-listen"],
            )
        agentListen = secureServer(
            reactor, serverEndpoint(reactor, options["enta-listen"]), options["enta-security"],
            options["enta-listen"],
        )
        return StartupGuard("entg", GatewayService(
            agentListen, reactor, peerConnect=peerConnect, peerListen=peerListen,
        ))

    return _built("entg", build)
