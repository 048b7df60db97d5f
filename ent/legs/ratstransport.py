"""
rats-tls legs for Twisted: a negotiated rats-tls session behind
L{ITransport}, and client and server endpoints that hand out such
transports once the attested handshake is over.

librats_tls has only blocking calls and negotiates only on a blocking fd,
so the handshake runs in a thread of its own.  After it the fd is made
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
import threading

from twisted.internet import abstract, defer, error, tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IConsumer,
    IPushProducer,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
    ITransport,
)
from twisted.internet.protocol import Protocol
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
# A handshake that takes longer than this fails (the fd stays blocking, the
# kernel times the socket calls out).
HANDSHAKE_TIMEOUT = 10.0
# How long loseConnection waits for buffered data before aborting.
CLOSE_TIMEOUT = 1.0


def inThread(reactor, name, function, *args):
    """
    Run a blocking C{function} in a thread of its own; a L{Deferred} fires
    in the reactor with its result.
    """
    d = defer.Deferred()

    def run():
        try:
            result = function(*args)
        except BaseException:
            reactor.callFromThread(d.errback, Failure())
        else:
            reactor.callFromThread(d.callback, result)

    threading.Thread(target=run, name=name, daemon=True).start()
    return d


def _setSocketTimeouts(sock, seconds):
    """
    Kernel timeouts on a blocking socket (C{settimeout} would make the fd
    non-blocking, which rats-tls refuses); 0 removes them.
    """
    value = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


def _address(sockaddr):
    host, port = sockaddr[0], sockaddr[1]
    if ":" in host:
        return IPv6Address("TCP", host, port)
    return IPv4Address("TCP", host, port)


def handshake(sock, session):
    """
    Blocking: run the rats-tls handshake on the connected C{sock}.
    """
    sock.setblocking(True)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _setSocketTimeouts(sock, HANDSHAKE_TIMEOUT)
    session.negotiate(sock)
    _setSocketTimeouts(sock, 0)


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

    def getPeer(self):
        return self._peer

    def getHost(self):
        return self._host

    def logPrefix(self):
        return f"RatsTls,{self.leg}"

    def __repr__(self):
        return f"<RatsTlsTransport {self.leg} to {self._peer.host}:{self._peer.port}>"


class RatsTlsSettings:
    """
    What every rats-tls leg of a process shares: the loaded library and the
    plugin choices; each connection gets its own session (handle).
    """

    def __init__(self, library, config):
        self.library = library
        self.config = config

    def session(self, server):
        from dataclasses import replace

        return self.library.session(replace(self.config, server=server))


def _connect(host, port, timeout):
    return socket.create_connection((host, port), timeout=timeout)


@implementer(IStreamClientEndpoint)
class RatsTlsClientEndpoint:
    """
    Connect to C{host}:C{port} and negotiate rats-tls, as the client.
    """

    log = Logger()

    def __init__(self, reactor, host, port, settings, timeout=10.0, leg="rats-tls", onHandshakeFailed=None):
        self.reactor = reactor
        self.host = host
        self.port = port
        self.settings = settings
        self.timeout = timeout
        self.leg = leg
        # Called with no arguments after each failed handshake, to count it.
        self.onHandshakeFailed = onHandshakeFailed

    def __repr__(self):
        return f"rats-tls {self.host}:{self.port}"

    @defer.inlineCallbacks
    def connect(self, protocolFactory):
        name = f"rats-tls connect {self.host}:{self.port}"
        try:
            sock = yield inThread(self.reactor, name, _connect, self.host, self.port, self.timeout)
        except OSError as e:
            raise error.ConnectError(f"{self.host}:{self.port}", e.strerror or str(e))
        try:
            session = self.settings.session(server=False)
            yield inThread(self.reactor, name, handshake, sock, session)
        except RatsTlsError as e:
            sock.close()
            if self.onHandshakeFailed is not None:
                self.onHandshakeFailed()
            self.log.error(
                "{leg} leg: rats-tls handshake with {peer} failed: {reason}",
                leg=self.leg,
                peer=f"{self.host}:{self.port}",
                reason=str(e),
            )
            raise error.ConnectError(f"{self.host}:{self.port}", f"rats-tls handshake failed: {e}")
        transport = RatsTlsTransport(self.reactor, sock, session, self.leg)
        protocol = protocolFactory.buildProtocol(transport.getPeer())
        if protocol is None:
            transport.abortConnection()
            raise error.ConnectError(f"{self.host}:{self.port}", "the factory refused the connection")
        transport.startWith(protocol)
        return protocol


class _Pending(Protocol):
    """
    Stands in for the real protocol while the handshake runs.
    """


class _HandshakePort(tcp.Port):
    """
    A TCP port whose accepted sockets go to a rats-tls handshake instead of
    becoming TCP transports.
    """

    log = Logger()

    def __init__(self, port, factory, settings, leg, interface, reactor, onHandshakeFailed=None):
        tcp.Port.__init__(self, port, _PendingFactory(), 50, interface, reactor)
        self.entFactory = factory
        self.settings = settings
        self.leg = leg
        self.onHandshakeFailed = onHandshakeFailed

    def transport(self, skt, protocol, addr, port, sessionno, reactor):
        """
        Called by L{tcp.Port.doRead} for each accepted socket.
        """
        self._handshake(skt, addr)
        return _NoTransport()

    @defer.inlineCallbacks
    def _handshake(self, sock, addr):
        peer = f"{addr[0]}:{addr[1]}"
        try:
            session = self.settings.session(server=True)
            yield inThread(self.reactor, f"rats-tls accept {peer}", handshake, sock, session)
        except RatsTlsError as e:
            sock.close()
            if self.onHandshakeFailed is not None:
                self.onHandshakeFailed()
            self.log.error(
                "{leg} leg: rats-tls handshake with {peer} failed, connection refused: {reason}",
                leg=self.leg,
                peer=peer,
                reason=str(e),
            )
            return
        if not self.connected:
            session.cleanup()
            sock.close()
            return
        transport = RatsTlsTransport(self.reactor, sock, session, self.leg)
        protocol = self.entFactory.buildProtocol(transport.getPeer())
        if protocol is None:
            transport.abortConnection()
            return
        transport.startWith(protocol)


class _PendingFactory:
    def buildProtocol(self, addr):
        return _Pending()

    def doStart(self):
        pass

    def doStop(self):
        pass


class _NoTransport:
    """
    What L{_Pending} is "connected" to: nothing; the socket belongs to the
    handshake thread.
    """


@implementer(IStreamServerEndpoint)
class RatsTlsServerEndpoint:
    """
    Listen on TCP C{port} and negotiate rats-tls, as the server, with each
    client before its protocol sees it.
    """

    def __init__(self, reactor, port, settings, interface="", leg="rats-tls", onHandshakeFailed=None):
        self.reactor = reactor
        self.port = port
        self.settings = settings
        self.interface = interface
        self.leg = leg
        self.onHandshakeFailed = onHandshakeFailed

    def listen(self, protocolFactory):
        def start():
            port = _HandshakePort(
                self.port,
                protocolFactory,
                self.settings,
                self.leg,
                self.interface,
                self.reactor,
                self.onHandshakeFailed,
            )
            port.startListening()
            protocolFactory.doStart()
            return port

        return defer.execute(start)
