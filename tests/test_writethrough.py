"""
Write-through: plain TCP connections send at once when nothing is queued,
keep order and backpressure when the socket is full, and every other
transport is written as before.
"""

import socket

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from ent.protocols.writethrough import _direct, writeThrough


class Collect(Protocol):
    def __init__(self, expected, done):
        self.expected, self.done, self.received = expected, done, []
        self.size = 0

    def dataReceived(self, data):
        self.received.append(data)
        self.size += len(data)
        if self.size >= self.expected:
            self.done.callback(b"".join(self.received))


class Holder(Protocol):
    def __init__(self, made):
        self.made = made

    def connectionMade(self):
        self.made.callback(self)


class WriteThroughTests(unittest.TestCase):
    timeout = 15

    def test_otherTransportsWriteAsBefore(self):
        """
        A transport that is not a plain connection gets C{writeSequence}.
        """
        transport = StringTransport()
        writeThrough(transport, [b"ab", b"cd"])
        writeThrough(transport, [b"e"])
        self.assertIsNone(_direct(transport))
        self.assertEqual(transport.value(), b"abcde")

    def connectPair(self, expected):
        done, connected = Deferred(), Deferred()
        server = Factory.forProtocol(lambda: Collect(expected, done))
        port = reactor.listenTCP(0, server, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = ClientFactory.forProtocol(lambda: Holder(connected))
        connector = reactor.connectTCP("127.0.0.1", port.getHost().port, client)
        self.addCleanup(connector.disconnect)
        return connected, done

    def test_sentAtOnce(self):
        """
        With nothing queued, the bytes are in the socket before the call
        returns: the transport holds nothing and never asks to write.
        """
        connected, done = self.connectPair(6)

        def write(holder):
            transport = holder.transport
            writeThrough(transport, [b"ab", b"cd"])
            writeThrough(transport, [b"ef"])
            self.assertEqual((transport.dataBuffer, transport._tempDataBuffer), (b"", []))
            self.assertFalse(transport in reactor.getWriters())
            return done

        connected.addCallback(write)
        connected.addCallback(self.assertEqual, b"abcdef")
        return connected

    def test_fullSocketKeepsOrder(self):
        """
        What the socket does not take is queued by the transport, and later
        writes go behind it: all bytes arrive, in order.
        """
        chunk = bytes(range(256)) * 1024
        count = 40
        connected, done = self.connectPair(len(chunk) * count)

        def write(holder):
            transport = holder.transport
            transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            for i in range(count):
                writeThrough(transport, [chunk[:1000], chunk[1000:]] if i % 2 else [chunk])
            self.assertTrue(transport._tempDataBuffer or transport.dataBuffer)
            return done

        connected.addCallback(write)
        connected.addCallback(self.assertEqual, chunk * count)
        return connected
