"""
ent-relay: a socket relay between an enclave and its parent host.

An enclave has no network, only vsock to its parent; a relay on each side
turns the app's TCP into vsock and back, as socat's C{TCP-LISTEN ...
VSOCK-CONNECT ...} and C{VSOCK-LISTEN ... TCP:...} do.  Each accepted
connection gets its own outgoing connection; bytes flow both ways with
backpressure, and a half-close is passed on.
"""

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from ent.errors import ConfigurationError, VsockAddressError
from ent.flow import Valve
from ent.legs import vsock
from ent.legs.endpoints import (
    addressText,
    checkClientDescription,
    checkPlainListen,
    checkServerDescription,
    clientEndpoint,
    failureText,
    isHostPort,
    portIn,
    serverEndpoint,
)
from ent.observability.stats import ServiceStats
from ent.services.options import ObservabilityOptions, _number, _usage
from ent.services.startup import _built, guarded

DEFAULT_MAX_CONNECTIONS = 1024


@implementer(IHalfCloseableProtocol)
class RelayEnd(Protocol):
    """
    One end of a relayed connection: what it reads is written to C{other}.

    Each end's transport is the producer of the other's, through a L{Valve}:
    an end that goes away must not close the other before that one has
    written what it still holds.
    """

    other = None
    fed = False
    readClosed = False
    writeClosed = False
    lost = False

    def __init__(self, relay):
        self.relay = relay

    def connectionMade(self):
        self.relay.ends.add(self)

    def dataReceived(self, data):
        self.counted(len(data))
        self.other.transport.write(data)

    def counted(self, n):
        raise NotImplementedError

    def feedFrom(self, source):
        """
        Pause C{source} while this end's transport has too much to write.
        """
        self.transport.registerProducer(Valve(source.transport), True)
        self.fed = True

    def stopFeeding(self):
        if self.fed:
            self.fed = False
            self.transport.unregisterProducer()

    def readConnectionLost(self):
        # Our peer sends no more: say the same to the other end's peer.
        if self.readClosed:
            return
        self.readClosed = True
        if self.other is not None and not self.other.lost:
            self.other.endWrite()
        self._closeIfDone()

    def endWrite(self):
        """
        Nothing more will be written here: half-close once what is buffered
        has gone (a registered producer would hold the FIN back).
        """
        self.stopFeeding()
        loseWriteConnection = getattr(self.transport, "loseWriteConnection", None)
        if loseWriteConnection is None:
            # A transport that cannot half-close (TLS) closes once flushed.
            self.transport.loseConnection()
        else:
            loseWriteConnection()

    def writeConnectionLost(self):
        self.writeClosed = True
        self._closeIfDone()

    def _closeIfDone(self):
        if self.readClosed and self.writeClosed:
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.lost = True
        self.relay.endLost(self)
        other = self.other
        if other is not None and not other.lost:
            other.stopFeeding()
            other.transport.loseConnection()


class IncomingEnd(RelayEnd):
    """
    An accepted connection, paused until its outgoing connection is up.
    """

    log = Logger()
    refused = False
    _connecting = None

    def __init__(self, relay):
        RelayEnd.__init__(self, relay)
        # What a transport still delivers after it was paused (a TLS
        # record's remainder, say): bounded by the pause to one read.
        self.early = []

    def connectionMade(self):
        relay = self.relay
        if relay.open >= relay.maxConnections:
            self.refused = True
            relay.refused += 1
            relay.drops.count("connection_limit", leg="incoming")
            self.transport.abortConnection()
            return
        RelayEnd.connectionMade(self)
        relay.accepted += 1
        relay.open += 1
        self.transport.pauseProducing()
        self._connecting = relay.target.connect(_Quietly(OutgoingEnd(relay, self)))
        self._connecting.addErrback(self._connectFailed)

    def dataReceived(self, data):
        if self.other is None:
            self.counted(len(data))
            self.early.append(data)
        else:
            RelayEnd.dataReceived(self, data)

    def counted(self, n):
        self.relay.bytesToTarget += n

    def _connectFailed(self, reason):
        self._connecting = None
        if self.lost:
            return
        self.relay.failedConnects += 1
        self.log.warn(
            "cannot relay {source} to {target}: {reason}",
            source=addressText(self.transport.getPeer()),
            target=self.relay.targetDescription,
            reason=failureText(reason),
        )
        self.transport.loseConnection()

    def join(self, outgoing):
        self._connecting = None
        self.other = outgoing
        self.feedFrom(outgoing)
        if self.early:
            outgoing.transport.write(b"".join(self.early))
            self.early = []
        if self.readClosed:
            outgoing.endWrite()
        else:
            outgoing.feedFrom(self)
            self.transport.resumeProducing()

    def connectionLost(self, reason):
        if self.refused:
            return
        self.relay.open -= 1
        RelayEnd.connectionLost(self, reason)
        if self._connecting is not None:
            self._connecting.cancel()


class OutgoingEnd(RelayEnd):
    """
    The connection made for an accepted one.
    """

    def __init__(self, relay, incoming):
        RelayEnd.__init__(self, relay)
        self.other = incoming

    def connectionMade(self):
        RelayEnd.connectionMade(self)
        if self.other.lost:
            self.transport.loseConnection()
        else:
            self.other.join(self)

    def counted(self, n):
        self.relay.bytesFromTarget += n


class _Quietly(Factory):
    """
    Hands C{end} to one outgoing connection, without the two log lines
    per connection of a noisy factory (or of C{connectProtocol}).
    """

    noisy = False

    def __init__(self, end):
        self.end = end

    def buildProtocol(self, addr):
        return self.end


class SocketRelayFactory(Factory):
    """
    Relays each accepted connection to C{target}, at most C{maxConnections}
    at once; the counters are for whoever wants to expose them.
    """

    noisy = False

    def __init__(self, target, targetDescription, maxConnections, drops):
        self.target = target
        self.targetDescription = targetDescription
        self.maxConnections = maxConnections
        self.drops = drops
        self.open = 0
        self.accepted = 0
        self.refused = 0
        self.failedConnects = 0
        self.bytesToTarget = 0
        self.bytesFromTarget = 0
        # Every connected end, both sides, so that a stop can cut them all.
        self.ends = set()
        self._idle = []

    def buildProtocol(self, addr):
        return IncomingEnd(self)

    def endLost(self, end):
        self.ends.discard(end)
        if not self.ends:
            waiting, self._idle = self._idle, []
            for d in waiting:
                d.callback(None)

    def closeAll(self):
        """
        Cut every relayed connection; fires when all of them are closed.
        """
        if not self.ends:
            return succeed(None)
        d = Deferred()
        self._idle.append(d)
        for end in list(self.ends):
            end.transport.abortConnection()
        return d


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
