"""
twistd plugins of ENT: C{twistd enta} and C{twistd entg}.

This is the only place that touches the global reactor.
"""

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from zope.interface import implementer

from ent.services.options import EntaOptions, EntgOptions


@implementer(IServiceMaker, IPlugin)
class _EntServiceMaker:
    def __init__(self, tapname, description, options, build):
        self.tapname = tapname
        self.description = description
        self.options = options
        self._build = build

    def makeService(self, options):
        from twisted.internet import reactor

        from ent.services import app

        return getattr(app, self._build)(options, reactor)


enta = _EntServiceMaker(
    "enta", "ENT agent: TUN device and capture/replay rules joined to a gateway", EntaOptions, "makeAgentService"
)
entg = _EntServiceMaker(
    "entg", "ENT gateway: relays an agent's frames to a peer gateway", EntgOptions, "makeGatewayService"
)


# The socket relay's builder lives outside ent.services.app, so its maker names it
# by its full dotted path.
from ent.services.socketrelay import RelayOptions  # noqa: E402


@implementer(IServiceMaker, IPlugin)
class _DottedServiceMaker(_EntServiceMaker):
    def makeService(self, options):
        from twisted.internet import reactor
        from twisted.python.reflect import namedAny

        return namedAny(self._build)(options, reactor)


entRelay = _DottedServiceMaker(
    "ent-relay",
    "ENT socket relay: TCP <-> vsock between an enclave and its parent host",
    RelayOptions,
    "ent.services.socketrelay.makeRelayService",
)
