"""
A stream leg that carries frames, and drops the connection on a framing
error with a log line naming the peer.
"""

from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from ent.errors import FramingError
from ent.framing import FrameDecoder


class FramedLeg(Protocol):
    """
    Base for a connection carrying frames.

    Subclasses implement L{framedDataReceived}, which gets whatever the
    decoder returns: a list of packets (C{relay=False}) or the bytes of
    whole frames (C{relay=True}).
    """

    log = Logger()
    leg = "leg"
    relay = False

    def __init__(self, drops):
        self.drops = drops
        self.decoder = FrameDecoder()

    def peerName(self):
        peer = self.transport.getPeer() if self.transport else None
        host = getattr(peer, "host", None)
        port = getattr(peer, "port", None)
        return f"{host}:{port}" if host is not None else str(peer)

    def dataReceived(self, data):
        try:
            if self.relay:
                out = self.decoder.frames(data)
            else:
                out = self.decoder.packets(data)
        except FramingError as e:
            self.drops.count(f"framing error on {self.leg} leg ({type(e).__name__})")
            self.log.error(
                "{leg} leg: dropping connection from {peer}: {error}",
                leg=self.leg, peer=self.peerName(), error=str(e),
            )
            self.decoder.clear()
            self.transport.abortConnection()
            return
        if out:
            self.framedDataReceived(out)

    def framedDataReceived(self, out):
        raise NotImplementedError()

    def connectionLost(self, reason):
        partial = self.decoder.clear()
        if partial:
            self.drops.count(f"partial frame cut off on {self.leg} leg")
