"""
A negotiated rats-tls session behind L{ITransport}, so that the framing and
relay protocols run on it as on TCP; the endpoints that negotiate it are in
L{ent.legs.ratsendpoints}.

librats_tls has only blocking calls and negotiates only on a blocking fd,
so the handshake runs in a worker of a handshake pool
(L{ent.legs.ratspool}).  After it the fd is made
non-blocking and the reactor drives the session like any other socket:
C{receive} when the fd is readable, C{transmit} when it is writable, each
returning at once when the socket is not ready.  So one thread, the
reactor's, is ever inside a session (OpenSSL's SSL objects are not
thread-safe), and both directions still flow at once.  The reactor's side
looks like any other transport, with backpressure both ways, so the
framing and relay protocols do not know they run on rats-tls.
"""

import fcntl
import socket
import struct
import termios

from twisted.internet import abstract, error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IConsumer, IPushProducer, ITransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ent.errors import RatsTlsClosed, RatsTlsError

# Bytes buffered for the socket before the producer feeding us is paused
# (it is resumed once they are all out).
HIGH_WATER = 512 * 1024
# Records taken from the session per readable event: bounds what one
# connection does per reactor turn.
RECORDS_PER_READ = 16
# Capacity of one receive; a TLS record carries at most 16 KiB.
RECEIVE_SIZE = 65536
# A TLS record's header: type, version, 2-byte length.
RECORD_HEADER = 5
# How long loseConnection waits for buffered data before aborting.
CLOSE_TIMEOUT = 1.0


def _address(sockaddr):
    host, port = sockaddr[0], sockaddr[1]
    if ":" in host:
        return IPv6Address("TCP", host, port)
    return IPv4Address("TCP", host, port)


@implementer(ITransport, IPushProducer, IConsumer)
class RatsTlsTransport(abstract.FileDescriptor):
    """
    A negotiated rats-tls session on a non-blocking socket, driven by the
    reactor: Twisted's own write buffer and producer handling, with the
    session's receive and send in place of the socket's.

    Every path to the end (peer close, error, loseConnection,
    abortConnection, the reactor stopping) ends in L{connectionLost}, which
    runs once: it frees the session (sending close_notify if the socket
    takes it) and closes the socket.
    """

    log = Logger()
    bufferSize = HIGH_WATER

    def __init__(self, reactor, sock, session, leg="rats-tls"):
        abstract.FileDescriptor.__init__(self, reactor)
        self.socket = sock
        self.session = session
        self.leg = leg
        self.protocol = None
        self.fileno = sock.fileno
        self._host = _address(sock.getsockname())
        self._peer = _address(sock.getpeername())
        self._reading = False
        # Whether the socket's queue starts at a record boundary (see
        # _wholeRecordQueued), and the SO_RCVLOWAT we set.
        self._aligned = True
        self._lowat = 1
        self._aborting = False
        self._closeTimer = None
        self._shutdownTrigger = None

    def startWith(self, protocol):
        """
        Hand the socket to the reactor and connect C{protocol}.
        """
        self.socket.setblocking(False)
        self.protocol = protocol
        self.connected = 1
        self.startReading()
        self._shutdownTrigger = self.reactor.addSystemEventTrigger("before", "shutdown", self._abortForShutdown)
        protocol.makeConnection(self)

    def _abortForShutdown(self):
        """
        The reactor is stopping: end now (a paused transport is not among
        the selectables the reactor disconnects by itself).
        """
        self._shutdownTrigger = None
        if not self.disconnected:
            self.connectionLost(Failure(error.ConnectionAborted("the reactor is stopping")))

    # Reading

    def startReading(self):
        self._reading = True
        abstract.FileDescriptor.startReading(self)

    def stopReading(self):
        self._reading = False
        abstract.FileDescriptor.stopReading(self)

    def doRead(self):
        """
        The socket is readable: hand over the records that are complete.
        """
        receive = self.session.receive
        for _ in range(RECORDS_PER_READ):
            if not self._wholeRecordQueued():
                return None
            try:
                data = receive(RECEIVE_SIZE)
            except RatsTlsClosed:
                return error.ConnectionDone("the rats-tls peer closed the connection")
            except RatsTlsError as e:
                return error.ConnectionLost(str(e))
            if data is None:
                # OpenSSL met a record that was not data (a session ticket)
                # and took what followed of the next one: boundary unknown
                # until the next record comes out whole.
                self._aligned = False
                return None
            self._aligned = True
            self.protocol.dataReceived(data)
            if not self._reading:
                return None
        return None

    def _wholeRecordQueued(self):
        """
        Whether a receive now would find a whole record in the socket, or
        its end or error.  A receive that finds half a record fails with
        "not ready" and the real library logs an ERROR line for it, which on
        a real network (records span several segments) would be nearly
        every record.  OpenSSL reads exactly one record at a time from the
        socket, so while the queue starts at a record boundary its header
        says how much must be there; until it is, SO_RCVLOWAT keeps the fd
        from polling readable, unless the kernel wants the queue drained.
        """
        if not self._aligned:
            return True
        try:
            header = self.socket.recv(RECORD_HEADER, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        except OSError:
            return True
        if not header:
            return True  # end of stream: receive reports the close
        need = RECORD_HEADER
        if len(header) == RECORD_HEADER:
            need += int.from_bytes(header[3:5], "big")
            queued = struct.unpack("i", fcntl.ioctl(self.socket, termios.FIONREAD, b"\0" * 4))[0]
            if queued >= need:
                self._setLowWater(1)
                return True
        if self._lowat == need:
            # Readable although the low-water mark is not met: the kernel
            # wants the queue drained (its buffer is under pressure or the
            # window nearly shut), and the record cannot complete otherwise.
            self._setLowWater(1)
            return True
        self._setLowWater(need)
        return False

    def _setLowWater(self, size):
        if self._lowat != size:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, size)
            self._lowat = size

    # Writing: Twisted's buffer; the session keeps a write OpenSSL took
    # part-way, and the buffer keeps its bytes at the front until it is out.

    def writeSomeData(self, data):
        send = self.session.send
        view = memoryview(data)
        done = 0
        try:
            while done < len(view):
                sent = send(view[done:])
                if not sent:
                    break
                done += sent
        except RatsTlsError as e:
            return error.ConnectionLost(str(e))
        return done

    # Ending

    def loseConnection(self):
        """
        Send what is buffered, then close; abort if that takes too long (a
        peer that stopped reading must not hold up a stop).
        """
        if self.disconnecting or self.disconnected:
            return
        abstract.FileDescriptor.loseConnection(self)
        self._closeTimer = self.reactor.callLater(CLOSE_TIMEOUT, self.abortConnection)

    def abortConnection(self):
        if self.disconnected or self._aborting:
            return
        self._aborting = True
        self.disconnecting = True
        self.stopReading()
        self.stopWriting()
        self.reactor.callLater(0, self.connectionLost, Failure(error.ConnectionAborted("rats-tls connection aborted")))

    def connectionLost(self, reason):
        if self.disconnected:
            return
        abstract.FileDescriptor.connectionLost(self, reason)
        if self._closeTimer is not None and self._closeTimer.active():
            self._closeTimer.cancel()
        if self._shutdownTrigger is not None:
            self.reactor.removeSystemEventTrigger(self._shutdownTrigger)
            self._shutdownTrigger = None
        try:
            self.session.cleanup()
        except RatsTlsError as e:
            self.log.warn("{leg} cleanup: {error}", leg=self.leg, error=str(e))
        self.socket.close()
        self.protocol.connectionLost(reason)

    def getPeerEvidence(self):
        """
        What the peer's evidence showed in the handshake
        (L{ent.legs.evidence.Evidence}), or C{None} if the library passed
        none to the verification callback.
        """
        return getattr(self.session, "evidence", None)

    def getPeer(self):
        return self._peer

    def getHost(self):
        return self._host

    def logPrefix(self):
        return f"RatsTls,{self.leg}"

    def __repr__(self):
        return f"<RatsTlsTransport {self.leg} to {self._peer.host}:{self._peer.port}>"
