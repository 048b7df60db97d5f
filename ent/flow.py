"""
Backpressure between the two sides of a relay whose sides come and go.
"""

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer


@implementer(IPushProducer)
class Valve:
    """
    Register this, not C{producer} itself, with a consumer that may
    disconnect.

    A transport that loses its connection calls C{stopProducing} on its
    producer; here that only pauses C{producer}, which then waits for the
    next consumer instead of being closed with the one that went away.
    """

    def __init__(self, producer):
        self.producer = producer

    def pauseProducing(self):
        self.producer.pauseProducing()

    def resumeProducing(self):
        self.producer.resumeProducing()

    def stopProducing(self):
        self.producer.pauseProducing()
