"""
rats-tls endpoints: client and server endpoints that hand out a
L{RatsTlsTransport} once the attested handshake is over.

librats_tls has only blocking calls and negotiates only on a blocking fd,
so each handshake runs in a thread of its own; after it the reactor alone
drives the session (L{ent.legs.ratstransport}).
"""

import socket
import struct
import threading

from twisted.internet import defer, error, tcp
from twisted.internet.interfaces import IStreamClientEndpoint, IStreamServerEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ent.errors import RatsTlsError
from ent.legs.ratstransport import RatsTlsTransport

# A handshake that takes longer than this fails (the fd stays blocking, the
# kernel times the socket calls out).
HANDSHAKE_TIMEOUT = 10.0


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


def handshake(sock, session):
    """
    Blocking: run the rats-tls handshake on the connected C{sock}.
    """
    sock.setblocking(True)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _setSocketTimeouts(sock, HANDSHAKE_TIMEOUT)
    session.negotiate(sock)
    _setSocketTimeouts(sock, 0)


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
