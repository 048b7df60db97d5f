"""
The gateway's legs: frames from one side are relayed, still framed, to the
other. Only whole frames are passed on, so a side that drops mid-frame
cannot corrupt the stream of the side that stays.
"""

from twisted.internet.protocol import Factory

from ent.protocols.framed import FramedLeg


class RelayLeg(FramedLeg):
    """
    One side of the gateway: C{side} is C{"agent"} or C{"peer"}.
    """

    relay = True

    def __init__(self, hub, side):
        self.side = side
        self.leg = side
        FramedLeg.__init__(self, hub.stats, hub.clock)
        self.hub = hub
        # The Valve registered as this leg's transport's producer, if any.
        self.feeding = None

    def legUp(self):
        self.hub.attach(self)

    def framedDataReceived(self, frames, count):
        self.hub.forward(self, frames, count)

    def legDown(self, reason):
        self.hub.detach(self, reason)


class RelayLegFactory(Factory):
    noisy = False

    def __init__(self, hub, side):
        self.hub = hub
        self.side = side

    def buildProtocol(self, addr):
        return RelayLeg(self.hub, self.side)
