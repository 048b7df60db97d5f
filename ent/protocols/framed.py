"""
A stream leg that carries frames, and drops the connection on a framing
error with a log line naming the peer.
"""

import socket

from twisted.internet.interfaces import IHandshakeListener, IPushProducer, ISystemHandle
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from ent.errors import EmptyFrame, FramingError
from ent.legs.tls import isTls
from ent.protocols.framing import FrameDecoder


def noDelay(transport):
    """
    Send each write at once: frames are packets of a TCP connection inside
    the tunnel, and Nagle's algorithm against its delayed ACKs would add
    tens of milliseconds to the round trip.
    """
    if ISystemHandle.providedBy(transport):
        try:
            transport.getHandle().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass  # not a TCP socket (unix, vsock): nothing to turn off


@implementer(IHandshakeListener, IPushProducer)
class FramedLeg(Protocol):
    """
    Base for a connection carrying frames.

    The leg is I{up} once its peer is authenticated: at once on plain TCP
    (and on rats-tls, whose handshake is over before the protocol starts),
    after the handshake on TLS, so that a peer with a bad certificate never
    takes the place of a good one.

    Subclasses set C{leg} before calling C{__init__} and implement
    L{legUp}, L{legDown} and L{framedDataReceived}, which gets a list of
    packets (C{relay=False}) or the bytes of whole frames (C{relay=True})
    and their count. What the leg receives is counted here, once per read.

    The leg is the push producer of its own reading: pause it through
    L{pauseProducing}, not through its transport, so that time we hold it
    paused never counts against its peer as a stall.
    """

    log = Logger()
    leg = "leg"
    relay = False
    up = False
    # A peer that sends part of a frame and then nothing for this long is
    # stuck or hostile: its connection is dropped.
    partialFrameTimeout = 30.0
    # How long a stop waits for what the leg still has to send before it
    # aborts the connection: a peer that reads nothing must not hold a
    # stopping process.
    closeTimeout = 1.0
    # Seconds a TLS handshake may take from connectionMade, in all (a peer
    # dripping bytes must not hold a connection); the services set it from
    # --handshake-timeout.
    handshakeTimeout = 10.0
    reading = True

    def __init__(self, stats, clock):
        self.stats = stats
        self.drops = stats.drops
        self.legStats = stats.leg(self.leg)
        self.clock = clock
        self.decoder = FrameDecoder()
        self._completed = 0
        self._stallCheck = None
        self._abortCheck = None
        self._handshakeCheck = None
        self._handshakeExpired = False

    def peerName(self):
        peer = self.transport.getPeer() if self.transport else None
        host = getattr(peer, "host", None)
        port = getattr(peer, "port", None)
        return f"{host}:{port}" if host is not None else str(peer)

    def connectionMade(self):
        if not isTls(self.transport):
            self._becomeUp()
        else:
            self._handshakeCheck = self.clock.callLater(self.handshakeTimeout, self._handshakeTooLong)

    def handshakeCompleted(self):
        self._cancelHandshakeCheck()
        self._becomeUp()

    def _cancelHandshakeCheck(self):
        if self._handshakeCheck is not None:
            if self._handshakeCheck.active():
                self._handshakeCheck.cancel()
            self._handshakeCheck = None

    def _handshakeTooLong(self):
        """
        The TLS handshake is not over within the budget: abort (counted and
        logged as a failed handshake by L{connectionLost}).
        """
        self._handshakeCheck = None
        self._handshakeExpired = True
        self.transport.abortConnection()

    def _becomeUp(self):
        self.up = True
        noDelay(self.transport)
        self.legStats.connected()
        self.legUp()

    def dataReceived(self, data):
        decoder = self.decoder
        before = decoder.completed
        try:
            if self.relay:
                out = decoder.frames(data)
            else:
                out = decoder.packets(data)
        except FramingError as e:
            self.drops.count("zero_length_frame" if isinstance(e, EmptyFrame) else "oversize_frame", leg=self.leg)
            self.log.error(
                "{leg} leg: dropping connection from {peer}: {reason}",
                leg=self.leg,
                peer=self.peerName(),
                reason=str(e),
            )
            self.decoder.clear()
            self.transport.abortConnection()
            return
        stats = self.legStats
        stats.bytesReceived += len(data)
        if out:
            count = decoder.completed - before
            stats.packetsReceived += count
            self._completed += 1
            self.framedDataReceived(out, count)
        self._armStallCheck()

    def _armStallCheck(self):
        if self.decoder.pending and self.reading and self._stallCheck is None:
            self._stallCheck = self.clock.callLater(self.partialFrameTimeout, self._checkStall, self._completed)

    def _cancelStallCheck(self):
        if self._stallCheck is not None:
            self._stallCheck.cancel()
            self._stallCheck = None

    def pauseProducing(self):
        """
        Read no more from the peer; a partial frame is not a stall meanwhile.
        """
        self.reading = False
        self._cancelStallCheck()
        self.transport.pauseProducing()

    def resumeProducing(self):
        """
        Read again; a partial frame gets a whole timeout from now.
        """
        if self._abortCheck is not None:
            return  # closing: nothing more is read
        self.reading = True
        self.transport.resumeProducing()
        self._armStallCheck()

    def stopProducing(self):
        self.close()

    def refuseUnattached(self):
        """
        Close a leg that is up but was not let in (the policy refused its
        party): it reads nothing more and is aborted at once.
        """
        self.refused = True
        self.pauseProducing()
        self.transport.abortConnection()

    def close(self):
        """
        Let the transport send what it holds, and abort it if that takes
        longer than C{closeTimeout}. Whoever registered a producer on it
        unregisters that first, or the close waits for the producer.
        """
        transport = self.transport
        if transport is None or self._abortCheck is not None:
            return
        transport.loseConnection()
        self._abortCheck = self.clock.callLater(self.closeTimeout, self._abortUnsent)

    def _abortUnsent(self):
        self._abortCheck = None
        self.log.warn(
            "{leg} leg: {peer} took nothing for {timeout}s while closing; connection aborted",
            leg=self.leg,
            peer=self.peerName(),
            timeout=self.closeTimeout,
        )
        self.transport.abortConnection()

    def _checkStall(self, completedBefore):
        """
        Drop the connection if no frame was completed since the check was
        armed and part of one is still pending.
        """
        self._stallCheck = None
        if not self.decoder.pending:
            return
        if self._completed == completedBefore:
            self.drops.count("stalled_partial_frame", leg=self.leg)
            self.log.error(
                "{leg} leg: dropping connection from {peer}: {pending} bytes of a "
                "frame and nothing more for {timeout}s",
                leg=self.leg,
                peer=self.peerName(),
                pending=self.decoder.pending,
                timeout=self.partialFrameTimeout,
            )
            self.decoder.clear()  # counted once, as stalled, not again as cut off
            self.transport.abortConnection()
        else:
            self._stallCheck = self.clock.callLater(self.partialFrameTimeout, self._checkStall, self._completed)

    def connectionLost(self, reason):
        self._cancelStallCheck()
        self._cancelHandshakeCheck()
        if self._abortCheck is not None:
            self._abortCheck.cancel()
            self._abortCheck = None
        partial = self.decoder.clear()
        if partial:
            self.drops.count("partial_frame_cut_off", leg=self.leg)
        if self.up:
            self.up = False
            self.legStats.lost()
            self.legDown(reason)
        else:
            self.stats.handshakeFailed(self.leg, "tls")
            peer = self.peerName()
            why = "timeout" if self._handshakeExpired else "failed"
            if self.stats.logAllowed((self.leg, peer.rpartition(":")[0], why)):
                self.log.error(
                    "{leg} leg: TLS handshake with {peer} failed, connection refused: {reason}"
                    " (logged once a minute per source and reason, all counted)",
                    leg=self.leg,
                    peer=peer,
                    reason=(
                        f"not done within {self.handshakeTimeout:g}s"
                        if self._handshakeExpired
                        else reason.getErrorMessage()
                    ),
                )

    def legUp(self):
        raise NotImplementedError()

    def legDown(self, reason):
        raise NotImplementedError()

    def framedDataReceived(self, out, count):
        raise NotImplementedError()
