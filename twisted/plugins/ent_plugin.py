"""
twistd plugins of ENT: C{twistd enta} and C{twistd entg}, and ENT's reactor
(C{twistd --reactor ent-epoll}, the default for ENT's services).

This is the only place that touches the global reactor.
"""

import sys

from twisted.application.reactors import Reactor
from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from zope.interface import implementer

from ent.services.options import EntaOptions, EntgOptions

entEpoll = Reactor(
    "ent-epoll", "ent.eventloop", "epoll reactor with a shorter path to each read (default for ENT's services)"
)


def _globalReactor():
    """
    The global reactor: ENT's own unless C{--reactor} chose another.
    """
    if "twisted.internet.reactor" not in sys.modules:
        from ent.eventloop import install

        install()
    from twisted.internet import reactor

    return reactor


@implementer(IServiceMaker, IPlugin)
class _EntServiceMaker:
    def __init__(self, tapname, description, options, build):
        self.tapname = tapname
        self.description = description
        self.options = options
        self._build = build

    def makeService(self, options):
        from ent.services import app

        return getattr(app, self._build)(options, _globalReactor())


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
        from twisted.python.reflect import namedAny

        return namedAny(self._build)(options, _globalReactor())


entRelay = _DottedServiceMaker(
    "ent-relay",
    "ENT socket relay: TCP <-> vsock between an enclave and its parent host",
    RelayOptions,
    "ent.services.socketrelay.makeRelayService",
)
