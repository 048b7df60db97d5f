"""
ent-relay: a socket relay between an enclave and its parent host.

An enclave has no network, only vsock to its parent; a relay on each side
turns the app's TCP into vsock and back, as socat's C{TCP-LISTEN ...
VSOCK-CONNECT ...} and C{VSOCK-LISTEN ... TCP:...} do.  Each accepted
connection gets its own outgoing connection; bytes flow both ways with
backpressure, and a half-close is passed on.
"""

from twisted.application.service import MultiService
from twisted.logger import Logger

from ent.errors import ConfigurationError, VsockAddressError
from ent.legs import vsock
from ent.legs.endpoints import (
    addressText,
    checkClientDescription,
    checkPlainListen,
    checkServerDescription,
    clientEndpoint,
    isHostPort,
    portIn,
    serverEndpoint,
)
from ent.observability.stats import ServiceStats
from ent.protocols.splice import DEFAULT_MAX_CONNECTIONS, SocketRelayFactory
from ent.services.options import ObservabilityOptions, _number, _usage
from ent.services.startup import _built, guarded


class SocketRelayService(MultiService):
    """
    Listens on one endpoint and relays each connection to another.
    """

    log = Logger()

    def __init__(
        self,
        listenEndpoint,
        connectEndpoint,
        reactor,
        maxConnections=DEFAULT_MAX_CONNECTIONS,
        listenDescription=None,
        connectDescription=None,
    ):
        MultiService.__init__(self)
        self.listenEndpoint = listenEndpoint
        self.listenDescription = listenDescription or repr(listenEndpoint)
        self.stats = ServiceStats("ent-relay", reactor)
        self.drops = self.stats.drops
        self.relay = SocketRelayFactory(
            connectEndpoint, connectDescription or repr(connectEndpoint), maxConnections, self.drops
        )
        self.stats.relay = self.relay
        self.port = None
        self._listening = None

    def privilegedStartService(self):
        MultiService.privilegedStartService(self)
        self._listen()

    def startService(self):
        if self._listening is None:
            self._listen()
        self.stats.start()
        MultiService.startService(self)

    def _listen(self):
        # A port we cannot listen on must fail the start (StartupGuard makes
        # it one line), not leave a relay running that nobody can reach.
        failures = []
        self._listening = self.listenEndpoint.listen(self.relay)
        self._listening.addCallbacks(self._listened, failures.append)
        if failures:
            self._listening = None
            failures[0].raiseException()

    def _listened(self, port):
        self.port = port
        self.log.info(
            "relaying {listen} ({address}) to {target}, at most {limit} connections at once",
            listen=self.listenDescription,
            address=addressText(port.getHost()),
            target=self.relay.targetDescription,
            limit=self.relay.maxConnections,
        )
        return port

    def stopService(self):
        d = MultiService.stopService(self)
        if self.port is not None:
            d.addCallback(lambda _: self.port.stopListening())
        elif self._listening is not None:
            self._listening.cancel()
        d.addCallback(lambda _: self.relay.closeAll())
        return d.addBoth(lambda r: (self.stats.stop(), r)[1])


def _connectAddress(text, what):
    if not isHostPort(text):
        raise ConfigurationError(f"{what} {text!r} is not HOST:PORT")
    host, _, port = text.rpartition(":")
    portIn(text, port, what)
    return text


def _vsockListen(text):
    cid, _, port = text.rpartition(":")
    description = f"vsock:{vsock.parsePort(port)}"
    if cid:
        description += f":cid={vsock.parseCid(cid)}"
    return description


def _vsockConnect(text):
    cid, colon, port = text.rpartition(":")
    if not colon:
        raise VsockAddressError("give CID:PORT to connect to")
    return f"vsock:{vsock.parseCid(cid)}:{vsock.parsePort(port)}"


class RelayOptions(ObservabilityOptions):
    """
    Options of the socket relay.
    """

    command = "ent-relay"
    synopsis = "[options]"
    longdesc = (
        "ent-relay: relay TCP to vsock and back, between an enclave and its parent. "
        "By default it listens on vsock and connects to TCP (the enclave's side); "
        "--tcp-to-vsock turns it round (the parent's side). --listen and --connect "
        "take any pair of Twisted endpoint strings instead."
    )

    optParameters = [
        [
            "tcp-address",
            None,
            None,
            "TCP side: HOST:PORT to connect to, or [ADDR:]PORT to listen on with --tcp-to-vsock.",
        ],
        [
            "vsock-address",
            None,
            None,
            "vsock side: [CID:]PORT to listen on, or CID:PORT to connect to with --tcp-to-vsock "
            "(with --mock-vsock: [HOST:]PORT and HOST:PORT of TCP).",
        ],
        [
            "max-concurrent-connections",
            None,
            str(DEFAULT_MAX_CONNECTIONS),
            "Connections beyond this many open at once are closed at once, and counted.",
        ],
        ["listen", None, None, "Accept connections on this server endpoint string (instead of the addresses)."],
        ["connect", None, None, "Relay each connection to this client endpoint string (with --listen)."],
    ]
    optFlags = [
        ["tcp-to-vsock", None, "Listen on TCP, connect to vsock (default: listen on vsock, connect to TCP)."],
        ["mock-vsock", None, "The vsock side is TCP (a PORT alone listens on 127.0.0.1), for development and tests."],
    ]

    @_usage
    def postOptions(self):
        self.checkObservability()
        limit = self["max-concurrent-connections"] = _number(self, "max-concurrent-connections")
        if limit < 1:
            raise ConfigurationError(f"--max-concurrent-connections {limit} is out of range: at least 1")
        addresses = [
            f"--{name}" for name in ("tcp-address", "vsock-address", "tcp-to-vsock", "mock-vsock") if self[name]
        ]
        if self["listen"] is not None or self["connect"] is not None:
            if addresses:
                raise ConfigurationError(f"--listen and --connect exclude {', '.join(addresses)}")
            if self["listen"] is None or self["connect"] is None:
                raise ConfigurationError("--listen and --connect go together")
            checkServerDescription(self["listen"], "--listen")
            checkClientDescription(self["connect"], "--connect")
            return
        if self["tcp-address"] is None or self["vsock-address"] is None:
            raise ConfigurationError("give --tcp-address and --vsock-address (or --listen and --connect)")
        if self["tcp-to-vsock"]:
            self["listen"] = checkPlainListen(self["tcp-address"], "--tcp-address")
            self["connect"] = self._vsock(self._mockConnect, _vsockConnect)
        else:
            self["listen"] = self._vsock(self._mockListen, _vsockListen)
            self["connect"] = _connectAddress(self["tcp-address"], "--tcp-address")

    def _vsock(self, mock, real):
        text = self["vsock-address"]
        if self["mock-vsock"]:
            return mock(text)
        try:
            return real(text)
        except VsockAddressError as e:
            raise ConfigurationError(f"--vsock-address {text!r}: {e}")

    @staticmethod
    def _mockListen(text):
        if ":" not in text:
            text = f"127.0.0.1:{text}"
        return checkPlainListen(text, "--vsock-address (mock)")

    @staticmethod
    def _mockConnect(text):
        return _connectAddress(text, "--vsock-address (mock)")


def makeRelayService(options, reactor):
    def build():
        return guarded(
            "ent-relay",
            SocketRelayService(
                serverEndpoint(reactor, options["listen"], "--listen"),
                clientEndpoint(reactor, options["connect"], "--connect"),
                reactor,
                options["max-concurrent-connections"],
                options["listen"],
                options["connect"],
            ),
            options,
            reactor,
        )

    return _built("ent-relay", build)
