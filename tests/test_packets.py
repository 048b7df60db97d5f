"""
Bad input from the tunnel: malformed packets and a fuzzed frame decoder.
"""

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial import unittest

from ent.errors import FramingError
from ent.observability.stats import DropReporter
from ent.protocols.framing import MAX_PACKET, FrameDecoder, frameSequence
from ent.protocols.packets import packetProblem, wellFormed


def ipv4(payload=b"", ihl=5):
    header = bytearray(ihl * 4)
    header[0] = 0x40 | ihl
    struct.pack_into(">H", header, 2, len(header) + len(payload))
    return bytes(header) + payload


def ipv6(payload=b""):
    header = bytearray(40)
    header[0] = 0x60
    struct.pack_into(">H", header, 4, len(payload))
    return bytes(header) + payload


class PacketCheckTests(unittest.TestCase):
    def test_wellFormed(self):
        self.assertIsNone(packetProblem(ipv4(b"x" * 100)))
        self.assertIsNone(packetProblem(ipv4(b"y", ihl=15)))
        self.assertIsNone(packetProblem(ipv6(b"z" * 10)))

    def test_problems(self):
        self.assertEqual(packetProblem(b"\x20" + b"\x00" * 30), "not_ip")
        self.assertEqual(packetProblem(b"\x45\x00\x00"), "truncated_ipv4_header")
        self.assertEqual(packetProblem(ipv4(b"x" * 10)[:-1]), "ipv4_length_mismatch")
        self.assertEqual(packetProblem(ipv4(b"x" * 10) + b"!"), "ipv4_length_mismatch")
        self.assertEqual(packetProblem(b"\x44" + ipv4(b"x" * 10)[1:]), "bad_ipv4_header_length")
        self.assertEqual(packetProblem(ipv6()[:30]), "truncated_ipv6_header")
        self.assertEqual(packetProblem(ipv6(b"abc")[:-1]), "ipv6_length_mismatch")

    def test_wellFormedKeepsGoodCountsBad(self):
        drops = DropReporter(Clock(), "test")
        good = [ipv4(b"a"), ipv6(b"b")]
        result = wellFormed([good[0], b"\x00garbage", good[1], b"\x45"], drops)
        self.assertEqual(result, good)
        self.assertEqual(drops.total[("gateway", "not_ip")], 1)
        self.assertEqual(drops.total[("gateway", "truncated_ipv4_header")], 1)


class DecoderFuzzTests(unittest.TestCase):
    """
    Property-based: whatever the bytes and however they are cut, the
    decoder returns exactly the frames, or raises a FramingError; it never
    returns a packet that was not sent as one.
    """

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(st.binary(min_size=1, max_size=3000), max_size=20),
        st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=30),
    )
    def test_anySplitGivesTheSamePackets(self, packets, cuts):
        stream = b"".join(frameSequence(packets))
        decoder = FrameDecoder()
        out, relayed = [], []
        relay = FrameDecoder()
        position = 0
        for cut in cuts * (len(stream) // max(1, sum(cuts)) + 1):
            piece = stream[position : position + cut]
            position += cut
            out.extend(decoder.packets(piece))
            relayed.append(relay.frames(piece))
            if position >= len(stream):
                break
        self.assertEqual(out, packets)
        self.assertEqual(b"".join(relayed), stream)
        self.assertEqual(decoder.pending, 0)

    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=4000), st.integers(min_value=1, max_value=64))
    def test_randomBytesNeverCrash(self, data, step):
        decoder = FrameDecoder()
        consumed = 0
        try:
            for i in range(0, len(data), step):
                for packet in decoder.packets(data[i : i + step]):
                    self.assertTrue(1 <= len(packet) <= MAX_PACKET)
                    consumed += 4 + len(packet)
        except FramingError:
            return
        self.assertEqual(consumed + decoder.pending, len(data))
