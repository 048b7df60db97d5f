"""
Build ENT's services from parsed options; the twistd plugins call these.
"""

from twisted.application.service import MultiService
from twisted.internet.error import CannotListenError
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized

from ent.cli import usageExit
from ent.endpoints import clientEndpoint, serverEndpoint
from ent.errors import ConfigurationError, EntError
from ent.legs import secureClient, secureServer


class StartupGuard(MultiService):
    """
    Turn a failed start into a one-line message and a non-zero exit.

    The child has already undone what it configured; a traceback would only
    hide the reason from the operator.

    It also carries what every service shares: the metrics endpoint
    (C{extra} services) and the log observer that C{--log-format} asks for.
    """

    log = Logger()

    def __init__(self, name, child, extra=(), logObserver=None):
        MultiService.__init__(self)
        self.name = name
        self.logObserver = logObserver
        child.setServiceParent(self)
        for service in extra:
            service.setServiceParent(self)

    def setServiceParent(self, parent):
        """
        twistd's application is our parent: an L{ILogObserver} component on
        it is the observer twistd logs to (unless C{--logger} names one).
        """
        if self.logObserver is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.logObserver)
        MultiService.setServiceParent(self, parent)

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
    """
    Build a service; an option that only its parser could check (an
    endpoint string) is refused as a usage error, like the other options.
    """
    try:
        return build()
    except ConfigurationError as e:
        usageExit(f"twistd {name}", str(e))
    except EntError as e:
        raise SystemExit(f"twistd {name}: {e}")


def guarded(name, service, options, reactor):
    """
    Wrap C{service} in a L{StartupGuard} with the metrics endpoint and log
    format that C{options} ask for.
    """
    extra = []
    if options["metrics"] is not None:
        from ent.metrics import metricsService

        extra.append(metricsService(serverEndpoint(reactor, options["metrics"], "--metrics"), service.stats))
    observer = None
    if options["log-format"] == "json":
        from ent.logs import observerFor

        observer = observerFor(getattr(options, "parent", None))
    return StartupGuard(name, service, extra, observer)


def makeAgentService(options, reactor):
    from ent.agent import AgentService
    from ent.stats import ServiceStats

    def build():
        stats = ServiceStats("enta", reactor)
        endpoint = secureClient(
            reactor, clientEndpoint(reactor, options["entg-connect"], "--entg-connect"), options["entg-security"],
            options["entg-connect"], leg="gateway", stats=stats,
        )
        return guarded("enta", AgentService(options, endpoint, reactor, stats), options, reactor)

    return _built("enta", build)


def makeGatewayService(options, reactor):
    from ent.gateway import GatewayService
    from ent.stats import ServiceStats

    def build():
        stats = ServiceStats("entg", reactor)
        peerConnect = peerListen = None
        peerSecurity = options["entg-security"]
        if options["entg-connect"] is not None:
            peerConnect = secureClient(
                reactor, clientEndpoint(reactor, options["entg-connect"], "--entg-connect"), peerSecurity,
                options["entg-connect"], leg="peer", stats=stats,
            )
        else:
            peerListen = secureServer(
                reactor, serverEndpoint(reactor, options["entg-listen"], "--entg-listen"), peerSecurity,
                options["entg-listen"], leg="peer", stats=stats,
            )
        agentListen = secureServer(
            reactor, serverEndpoint(reactor, options["enta-listen"], "--enta-listen"), options["enta-security"],
            options["enta-listen"], leg="agent", stats=stats,
        )
        service = GatewayService(
            agentListen, reactor, peerConnect=peerConnect, peerListen=peerListen, stats=stats,
        )
        return guarded("entg", service, options, reactor)

    return _built("entg", build)
