"""
rats-tls endpoints: client and server endpoints that hand out a
L{RatsTlsTransport} once the attested handshake is over.

librats_tls has only blocking calls and negotiates only on a blocking fd,
so each connection's session is made (C{rats_tls_init}) and negotiated in
a worker of a bounded L{HandshakePool}, never in the reactor's thread,
within one L{Budget} for the whole handshake; after it the reactor alone
drives the session (L{ent.legs.ratstransport}).
"""

import fcntl
import socket
import struct
import termios
from collections import OrderedDict

from twisted.internet import defer, error, tcp
from twisted.internet.interfaces import IStreamClientEndpoint, IStreamServerEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from ent.errors import HandshakeRefused, HandshakeTimeout, RatsTlsError
from ent.legs.endpoints import LISTEN_BACKLOG
from ent.legs.ratspool import Budget, HandshakePool
from ent.legs.ratstransport import RatsTlsTransport
from ent.ratelimit import OncePer

#: Default budget of a whole handshake (--handshake-timeout); each socket
#: call also has it as a kernel timeout, a backstop.
HANDSHAKE_TIMEOUT = 10.0

#: What a failure counts as (ent_handshake_failures{kind}): the pool could
#: not take the connection, or the handshake itself failed (timeouts and
#: resets right after it included).
BUSY = "rats-tls-busy"
FAILED = "rats-tls"

#: Accepted connections waiting in the reactor for their first TLS record
#: (the ClientHello), in all and per source: beyond, the oldest is closed.
MAX_WAITING_HELLOS = 1024
MAX_WAITING_HELLOS_PER_SOURCE = 64
# A TLS record: type 22 (handshake), version, 2-byte length.
_TLS_HANDSHAKE = 22
_RECORD_HEADER = 5
_MAX_RECORD = 16384 + 2048


class _HelloWait:
    """
    An accepted connection held in the reactor until its whole first TLS
    record (the ClientHello) has arrived, so that a connection that sends
    part of one and stalls costs a file descriptor, never a handshake
    thread: the pool's workers only see peers that have spoken.

    The kernel wakes the reactor only once that many bytes are queued
    (C{SO_RCVLOWAT}), so a slow sender costs no busy loop either.
    """

    def __init__(self, port, sock, addr, budget):
        self.port = port
        self.sock = sock
        self.addr = addr
        self.budget = budget
        self._lowat = 1

    def fileno(self):
        return self.sock.fileno()

    def logPrefix(self):
        return "rats-tls hello"

    def connectionLost(self, reason):
        pass

    def doRead(self):
        if self.budget.expired:
            self.budget.finish()
            self.port._helloFailed(self, "timeout", self.budget.error())
            return
        try:
            head = self.sock.recv(_RECORD_HEADER, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError as e:
            self.port._helloFailed(self, "failed", f"the connection broke before its ClientHello: {e.strerror or e}")
            return
        if not head:
            expired = self.budget.finish()
            reason = "timeout" if expired else "failed"
            detail = self.budget.error() if expired else "closed before its ClientHello"
            self.port._helloFailed(self, reason, detail)
            return
        if head[0] != _TLS_HANDSHAKE:
            self.port._helloFailed(self, "failed", "it does not speak TLS")
            return
        want = _RECORD_HEADER
        if len(head) == _RECORD_HEADER:
            want += int.from_bytes(head[3:5], "big")
            if want > _RECORD_HEADER + _MAX_RECORD:
                self.port._helloFailed(self, "failed", "its first TLS record is larger than TLS allows")
                return
        queued = struct.unpack("i", fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]
        if len(head) == _RECORD_HEADER and queued >= want:
            self.port._helloArrived(self)
            return
        if queued < self._lowat:
            # Woken with less than asked for: the peer closed (or broke)
            # in the middle of its first record.
            self.port._helloFailed(self, "failed", "closed in the middle of its ClientHello")
            return
        if want != self._lowat:
            self._lowat = want
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)


def _setSocketTimeouts(sock, seconds):
    """
    Kernel timeouts on a blocking socket (C{settimeout} would make the fd
    non-blocking, which rats-tls refuses); 0 removes them.
    """
    value = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


def handshake(sock, session, timeout=HANDSHAKE_TIMEOUT):
    """
    Blocking: run the rats-tls handshake on the connected C{sock}; no
    socket call may take longer than C{timeout}.
    """
    sock.setblocking(True)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _setSocketTimeouts(sock, timeout)
    session.negotiate(sock)
    _setSocketTimeouts(sock, 0)


def _cleanupQuietly(session):
    try:
        session.cleanup()
    except RatsTlsError:
        pass  # nothing more to free


def _discard(session, sock):
    """
    In the reactor: free a negotiated session that will not be used, and
    close its socket (non-blocking first: close_notify must not block).
    """
    try:
        sock.setblocking(False)
    except OSError:
        pass
    _cleanupQuietly(session)
    sock.close()


def _negotiate(budget, settings, sock, server):
    """
    In a worker: a new session (C{rats_tls_init}), negotiated on C{sock};
    freed again if the handshake fails.
    """
    budget.check()
    session = settings.session(server=server)
    try:
        budget.check()
        handshake(sock, session, budget.seconds)
    except BaseException:
        _cleanupQuietly(session)
        raise
    return session


def _serverSteps(budget, settings, sock):
    """
    In a worker: the accepting side's session on the accepted C{sock}.
    """
    return _negotiate(budget, settings, sock, server=True)


def _clientSteps(budget, settings, host, port, connectTimeout):
    """
    In a worker: connect, then the connecting side's session.
    """
    budget.check()
    sock = socket.create_connection((host, port), timeout=connectTimeout)
    try:
        budget.attach(sock)
        return sock, _negotiate(budget, settings, sock, server=False)
    except BaseException:
        budget.detach()
        sock.close()
        raise


def _submit(pool, function, *args, **kwargs):
    """
    C{pool.submit}, whose every failure to take the job is a L{HandshakeRefused}.
    """
    try:
        return pool.submit(function, *args, **kwargs)
    except Exception as e:
        return defer.fail(HandshakeRefused(f"the handshake pool cannot run the handshake: {e!r}"))


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


@implementer(IStreamClientEndpoint)
class RatsTlsClientEndpoint:
    """
    Connect to C{host}:C{port} and negotiate rats-tls, as the client; the
    connect, the session and the handshake run in C{pool} (by default one
    of the endpoint's own) within C{handshakeTimeout} seconds in all.
    """

    log = Logger()

    def __init__(
        self,
        reactor,
        host,
        port,
        settings,
        timeout=10.0,
        leg="rats-tls",
        onHandshakeFailed=None,
        handshakeTimeout=HANDSHAKE_TIMEOUT,
        pool=None,
    ):
        self.reactor = reactor
        self.host = host
        self.port = port
        self.settings = settings
        self.timeout = timeout
        self.leg = leg
        # Called with the kind (FAILED, BUSY) of each failed handshake, to count it.
        self.onHandshakeFailed = onHandshakeFailed
        self.handshakeTimeout = handshakeTimeout
        self.pool = pool

    def __repr__(self):
        return f"rats-tls {self.host}:{self.port}"

    def _pool(self):
        if self.pool is None:
            self.pool = HandshakePool(self.reactor, name=f"rats-tls connect {self.host}:{self.port}")
        return self.pool

    def _failed(self, kind, reason):
        if self.onHandshakeFailed is not None:
            self.onHandshakeFailed(kind)
        peer = f"{self.host}:{self.port}"
        self.log.error(
            "{leg} leg: rats-tls handshake with {peer} failed: {reason}", leg=self.leg, peer=peer, reason=reason
        )
        return error.ConnectError(peer, f"rats-tls handshake failed: {reason}")

    @defer.inlineCallbacks
    def connect(self, protocolFactory):
        peer = f"{self.host}:{self.port}"
        budget = Budget(self.reactor, self.handshakeTimeout, peer)
        try:
            sock, session = yield _submit(
                self._pool(),
                _clientSteps,
                budget,
                self.settings,
                self.host,
                self.port,
                min(self.timeout, self.handshakeTimeout),
                onCancel=budget.cancel,
                onLate=lambda result: _discard(result[1], result[0]),
            )
        except OSError as e:
            budget.finish()
            raise error.ConnectError(peer, e.strerror or str(e))
        except HandshakeRefused as e:
            budget.finish()
            raise self._failed(BUSY, str(e))
        except (RatsTlsError, HandshakeTimeout) as e:
            raise self._failed(FAILED, budget.error() if budget.finish() else e)
        except BaseException:
            budget.finish()
            raise
        if budget.finish():
            _discard(session, sock)
            raise self._failed(FAILED, budget.error())
        try:
            transport = RatsTlsTransport(self.reactor, sock, session, self.leg)
        except OSError as e:
            _discard(session, sock)
            raise self._failed(FAILED, f"the connection ended right after the handshake: {e.strerror or e}")
        protocol = protocolFactory.buildProtocol(transport.getPeer())
        if protocol is None:
            _discard(session, sock)
            raise error.ConnectError(peer, "the factory refused the connection")
        transport.startWith(protocol)
        return protocol


class _Pending(Protocol):
    """
    Stands in for the real protocol while the handshake runs.
    """


class _HandshakePort(tcp.Port):
    """
    A TCP port whose accepted sockets go to a rats-tls handshake in C{pool}
    instead of becoming TCP transports.

    Anyone who reaches the port can make a handshake fail, so each failure
    is counted, and logged at most once a minute per source and reason.
    """

    log = Logger()

    def __init__(
        self,
        port,
        factory,
        settings,
        leg,
        interface,
        reactor,
        onHandshakeFailed=None,
        handshakeTimeout=HANDSHAKE_TIMEOUT,
        pool=None,
    ):
        tcp.Port.__init__(self, port, _PendingFactory(), LISTEN_BACKLOG, interface, reactor)
        self.entFactory = factory
        self.settings = settings
        self.leg = leg
        self.onHandshakeFailed = onHandshakeFailed
        self.handshakeTimeout = handshakeTimeout
        self._ownPool = pool is None
        self.pool = pool if pool is not None else HandshakePool(reactor, name=f"rats-tls accept {leg}")
        self.logAllowed = OncePer(reactor)
        # Connections waiting for their ClientHello, oldest first.
        self.waiting = OrderedDict()
        self._waitingBySource = {}

    def transport(self, skt, protocol, addr, port, sessionno, reactor):
        """
        Called by L{tcp.Port.doRead} for each accepted socket.
        """
        self._accepted(skt, addr)
        return _NoTransport()

    def connectionLost(self, reason):
        tcp.Port.connectionLost(self, reason)
        for wait in list(self.waiting):
            self._stopWaiting(wait)
            wait.budget.finish()
            wait.sock.close()
        if self._ownPool:
            self.pool.stop()

    def _accepted(self, sock, addr):
        budget = Budget(self.reactor, self.handshakeTimeout, f"{addr[0]}:{addr[1]}")
        budget.attach(sock)
        source = addr[0]
        mine = self._waitingBySource.setdefault(source, OrderedDict())
        if len(mine) >= MAX_WAITING_HELLOS_PER_SOURCE:
            self._evictWaiting(next(iter(mine)))
        elif len(self.waiting) >= MAX_WAITING_HELLOS:
            self._evictWaiting(next(iter(self.waiting)))
        # Peeked at from the reactor; the handshake makes it blocking again.
        sock.setblocking(False)
        wait = _HelloWait(self, sock, addr, budget)
        self.waiting[wait] = None
        self._waitingBySource.setdefault(source, OrderedDict())[wait] = None
        self.reactor.addReader(wait)
        # Whatever is already queued is looked at now.
        wait.doRead()

    def _stopWaiting(self, wait):
        if wait not in self.waiting:
            return False
        del self.waiting[wait]
        self.reactor.removeReader(wait)
        source = wait.addr[0]
        mine = self._waitingBySource.get(source)
        if mine is not None:
            mine.pop(wait, None)
            if not mine:
                del self._waitingBySource[source]
        return True

    def _evictWaiting(self, wait):
        self._helloFailed(wait, "busy", "closed to make room: too many connections wait for their ClientHello")

    def _helloFailed(self, wait, reason, detail):
        if not self._stopWaiting(wait):
            return
        wait.budget.finish()
        wait.sock.close()
        self._refused(wait.addr, BUSY if reason == "busy" else FAILED, reason, detail)

    def _helloArrived(self, wait):
        if not self._stopWaiting(wait):
            return
        wait.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        self._handshake(wait.sock, wait.addr, wait.budget)

    def _handshake(self, sock, addr, budget):
        d = _submit(self.pool, _serverSteps, budget, self.settings, sock)
        d.addCallbacks(
            self._negotiated, self._notNegotiated, callbackArgs=(sock, addr, budget), errbackArgs=(sock, addr, budget)
        )
        d.addErrback(self._unexpected, addr)
        return d

    def _negotiated(self, session, sock, addr, budget):
        if budget.finish():
            _discard(session, sock)
            self._refused(addr, FAILED, "timeout", budget.error())
            return
        if not self.connected:
            _discard(session, sock)
            return
        try:
            transport = RatsTlsTransport(self.reactor, sock, session, self.leg)
        except OSError as e:
            _discard(session, sock)
            self._refused(addr, FAILED, "reset", f"the connection ended right after the handshake: {e.strerror or e}")
            return
        protocol = self.entFactory.buildProtocol(transport.getPeer())
        if protocol is None:
            _discard(session, sock)
            return
        transport.startWith(protocol)

    def _notNegotiated(self, failure, sock, addr, budget):
        expired = budget.finish()
        sock.close()
        if not self.connected:
            return None
        e = failure.value
        if isinstance(e, HandshakeRefused):
            self._refused(addr, BUSY, "busy", e)
        elif expired:
            self._refused(addr, FAILED, "timeout", budget.error())
        elif isinstance(e, (RatsTlsError, HandshakeTimeout, OSError)):
            self._refused(addr, FAILED, "failed", e)
        else:
            return failure
        return None

    def _unexpected(self, failure, addr):
        if self.onHandshakeFailed is not None:
            self.onHandshakeFailed(FAILED)
        self.log.failure("{leg} leg: rats-tls connection from {peer} failed", failure, leg=self.leg, peer=addr[0])

    def _refused(self, addr, kind, reason, detail):
        if self.onHandshakeFailed is not None:
            self.onHandshakeFailed(kind)
        if self.logAllowed((addr[0], reason)):
            self.log.error(
                "{leg} leg: rats-tls handshake with {peer} failed, connection refused: {detail}"
                " (logged once a minute per source and reason, all counted)",
                leg=self.leg,
                peer=f"{addr[0]}:{addr[1]}",
                reason=reason,
                detail=str(detail),
            )


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
    client before its protocol sees it; the handshakes run in C{pool} (by
    default one of the port's own, stopped with it), C{handshakeTimeout}
    seconds each in all.
    """

    def __init__(
        self,
        reactor,
        port,
        settings,
        interface="",
        leg="rats-tls",
        onHandshakeFailed=None,
        handshakeTimeout=HANDSHAKE_TIMEOUT,
        pool=None,
    ):
        self.reactor = reactor
        self.port = port
        self.settings = settings
        self.interface = interface
        self.leg = leg
        self.onHandshakeFailed = onHandshakeFailed
        self.handshakeTimeout = handshakeTimeout
        self.pool = pool

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
                self.handshakeTimeout,
                self.pool,
            )
            port.startListening()
            protocolFactory.doStart()
            return port

        return defer.execute(start)
