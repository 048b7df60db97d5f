"""
Splice two stream connections: each accepted connection gets its own
outgoing one, bytes flow both ways with backpressure, and a half-close is
passed on.  The socket relay (TCP <-> vsock) and the rootless agent's
exposures (slirp's Unix socket <-> the local service) are built on it.
"""

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from ent.flow import Valve
from ent.legs.endpoints import addressText, failureText

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
