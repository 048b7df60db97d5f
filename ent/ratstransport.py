"""
rats-tls legs for Twisted: a thread-driven rats-tls session behind
L{ITransport}, and client and server endpoints that hand out such
transports once the attested handshake is over.

librats_tls only offers blocking calls on a blocking fd, so each connection
has its own threads: one for the handshake, a reader that loops on
C{receive} and hands data to the reactor with C{callFromThread}, and one
ordered writer fed by a queue. The reactor's side looks like any other
transport, with backpressure both ways, so the framing and relay protocols
do not know they run on rats-tls.
"""

import collections
import socket
import struct
import threading

from zope.interface import implementer

from twisted.internet import defer, error, tcp
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

from ent.errors import RatsTlsClosed, RatsTlsError

# Bytes queued for the writer before the producer feeding us is paused,
# and the level at which it is resumed.
HIGH_WATER = 512 * 1024
LOW_WATER = 128 * 1024
# Records the reader may hand to the reactor before it waits for them to
# be consumed: bounds the memory a fast peer can make us hold.
READ_AHEAD = 32
RECEIVE_SIZE = 65536
# A handshake that takes longer than this fails (the fd stays blocking, the
# kernel times the socket calls out).
HANDSHAKE_TIMEOUT = 10.0
# How long loseConnection waits for queued data before aborting.
CLOSE_TIMEOUT = 1.0


def _startThread(name, target, *args):
    thread = threading.Thread(target=target, args=args, name=name, daemon=True)
    thread.start()
    return thread


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

    _startThread(name, run)
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
class RatsTlsTransport:
    """
    A negotiated rats-tls session as a Twisted transport.

    Every path to the end (peer close, error, loseConnection,
    abortConnection, the reactor stopping) goes through L{_shutDown}, which
    runs once, and ends in exactly one C{connectionLost}.
    """

    log = Logger()
    disconnecting = False
    disconnected = False

    def __init__(self, reactor, sock, session, leg="rats-tls"):
        self.reactor = reactor
        self.socket = sock
        self.session = session
        self.leg = leg
        self.protocol = None
        self._host = _address(sock.getsockname())
        self._peer = _address(sock.getpeername())
        self._lock = threading.Lock()
        self._queue = collections.deque()
        self._queued = threading.Condition(self._lock)
        self._buffered = 0
        self._readGate = threading.Event()
        self._readGate.set()
        self._readSlots = threading.Semaphore(READ_AHEAD)
        self._ending = False
        self._reason = None
        self._producer = None
        self._producerPaused = False
        self._streaming = True
        self._closeTimer = None
        self._threads = []
        self._lost = defer.Deferred()

    # Life cycle

    def startWith(self, protocol):
        """
        Connect C{protocol} and start the reader and writer threads.
        """
        self.protocol = protocol
        protocol.makeConnection(self)
        peer = f"{self._peer.host}:{self._peer.port}"
        self._threads = [
            _startThread(f"rats-tls reader {peer}", self._readLoop),
            _startThread(f"rats-tls writer {peer}", self._writeLoop),
        ]
        self._shutdownTrigger = self.reactor.addSystemEventTrigger(
            "before", "shutdown", self._abortForShutdown
        )

    def _abortForShutdown(self):
        """
        The reactor is stopping: end now, and make it wait (briefly: the
        close thread's waits are bounded) for our connectionLost.
        """
        self.abortConnection()
        return self._lost

    def _shutDown(self, reason):
        """
        Start ending the connection, once, whoever asks: close the session
        and the socket in a thread, then report C{reason}.
        """
        with self._lock:
            if self._ending:
                return
            self._ending = True
            self._reason = reason
            self._queue.clear()
            self._queued.notify_all()
        self._readGate.set()
        # The reader may wait for a read-ahead slot the reactor will not
        # free any more (it is stopping): give it one to see the end.
        self._readSlots.release()
        _startThread("rats-tls close", self._close)

    def _close(self):
        """
        Blocking: send close_notify, free the handle, release the blocked
        reader by shutting the socket down, and close the fd only once the
        library is done with it.
        """
        try:
            self.session.cleanup()
        except RatsTlsError as e:
            self.log.warn("{leg} cleanup: {error}", leg=self.leg, error=str(e))
        try:
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.session.wait_cleaned(5.0)
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(5.0)
        self.socket.close()
        self.reactor.callFromThread(self._connectionLost)

    def _connectionLost(self):
        if self.disconnected:
            return
        self.disconnected = True
        if self._closeTimer is not None and self._closeTimer.active():
            self._closeTimer.cancel()
        try:
            self.reactor.removeSystemEventTrigger(self._shutdownTrigger)
        except (ValueError, KeyError):
            pass  # the reactor is running the trigger now
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.stopProducing()
        try:
            self.protocol.connectionLost(Failure(self._reason))
        finally:
            self._lost.callback(None)

    # Reading: the reader thread and its hand-over to the reactor

    def _readLoop(self):
        receive = self.session.receive
        while True:
            self._readGate.wait()
            self._readSlots.acquire()
            if self._ending:
                return
            try:
                data = receive(RECEIVE_SIZE)
            except RatsTlsClosed:
                self._shutDown(error.ConnectionDone("the rats-tls peer closed the connection"))
                return
            except RatsTlsError as e:
                self._shutDown(error.ConnectionLost(str(e)))
                return
            self.reactor.callFromThread(self._deliver, data)

    def _deliver(self, data):
        self._readSlots.release()
        if not self.disconnected:
            self.protocol.dataReceived(data)

    def pauseProducing(self):
        self._readGate.clear()

    def resumeProducing(self):
        self._readGate.set()

    def stopProducing(self):
        self.loseConnection()

    # Writing: one ordered writer thread, backpressure to our producer

    def write(self, data):
        if not data:
            return
        with self._lock:
            if self._ending or self.disconnecting:
                return
            self._queue.append(bytes(data))
            self._buffered += len(data)
            buffered = self._buffered
            self._queued.notify()
        if buffered > HIGH_WATER and self._producer is not None and not self._producerPaused:
            self._producerPaused = True
            self._producer.pauseProducing()

    def writeSequence(self, data):
        self.write(b"".join(data))

    def _writeLoop(self):
        transmit = self.session.transmit
        while True:
            with self._lock:
                while not self._queue and not self._ending and not self.disconnecting:
                    self._queued.wait()
                if self._ending:
                    return
                if not self._queue:
                    # loseConnection and everything written: end cleanly.
                    break
                # Coalesce what is queued into one transmit.
                chunks = []
                size = 0
                while self._queue and size < 256 * 1024:
                    chunk = self._queue.popleft()
                    chunks.append(chunk)
                    size += len(chunk)
            try:
                transmit(b"".join(chunks) if len(chunks) > 1 else chunks[0])
            except RatsTlsError as e:
                self._shutDown(error.ConnectionLost(str(e)))
                return
            with self._lock:
                self._buffered -= size
                drained = self._buffered < LOW_WATER
            if drained and self._producerPaused:
                self.reactor.callFromThread(self._resumeProducer)
        self._shutDown(error.ConnectionDone("connection closed cleanly"))

    def _resumeProducer(self):
        with self._lock:
            drained = self._buffered < LOW_WATER
        if drained and self._producerPaused and self._producer is not None:
            self._producerPaused = False
            self._producer.resumeProducing()

    def registerProducer(self, producer, streaming):
        if self._producer is not None:
            raise RuntimeError(
                f"Cannot register producer {producer!r}, because producer "
                f"{self._producer!r} was never unregistered."
            )
        if self.disconnected:
            producer.stopProducing()
            return
        self._producer = producer
        self._streaming = streaming
        self._producerPaused = False
        if not streaming:
            producer.resumeProducing()

    def unregisterProducer(self):
        self._producer = None
        self._producerPaused = False

    # Ending on request

    def loseConnection(self):
        """
        Send what is queued, then close; abort if that takes too long (a
        peer that stopped reading must not hold up a stop).
        """
        if self.disconnecting or self.disconnected:
            return
        with self._lock:
            self.disconnecting = True
            self._queued.notify_all()
        self._closeTimer = self.reactor.callLater(CLOSE_TIMEOUT, self.abortConnection)

    def abortConnection(self):
        self.disconnecting = True
        self._shutDown(error.ConnectionAborted("rats-tls connection aborted"))

    def getPeer(self):
        return self._peer

    def getHost(self):
        return self._host

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

    def __init__(self, reactor, host, port, settings, timeout=10.0, leg="rats-tls",
                 onHandshakeFailed=None):
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
                leg=self.leg, peer=f"{self.host}:{self.port}", reason=str(e),
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
                leg=self.leg, peer=peer, reason=str(e),
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

    def __init__(self, reactor, port, settings, interface="", leg="rats-tls",
                 onHandshakeFailed=None):
        self.reactor = reactor
        self.port = port
        self.settings = settings
        self.interface = interface
        self.leg = leg
        self.onHandshakeFailed = onHandshakeFailed

    def listen(self, protocolFactory):
        def start():
            port = _HandshakePort(
                self.port, protocolFactory, self.settings, self.leg, self.interface, self.reactor,
                self.onHandshakeFailed,
            )
            port.startListening()
            protocolFactory.doStart()
            return port

        return defer.execute(start)
