"""
The frame decoder: partial and coalesced reads, oversize and empty frames.
"""

import struct

from twisted.trial import unittest

from ent.errors import EmptyFrame, FrameTooLarge
from ent.protocols.framing import MAX_PACKET, FrameDecoder, frame, frameSequence


def ipv4(payload=b"x" * 20):
    return b"\x45" + payload


class FrameEncodingTests(unittest.TestCase):
    def test_frameIsBigEndianLengthThenPacket(self):
        self.assertEqual(frame(b"\x45abc"), b"\x00\x00\x00\x04\x45abc")

    def test_frameSequenceAlternatesHeaderAndPacket(self):
        packets = [b"\x45" * 3, b"\x60" * 300]
        self.assertEqual(frameSequence(packets), [struct.pack(">I", 3), packets[0], struct.pack(">I", 300), packets[1]])


class PacketDecodingTests(unittest.TestCase):
    def test_coalescedFrames(self):
        packets = [ipv4(bytes([i]) * i) for i in range(1, 20)]
        decoder = FrameDecoder()
        self.assertEqual(decoder.packets(b"".join(frameSequence(packets))), packets)
        self.assertEqual(decoder.pending, 0)

    def test_byteByByte(self):
        packets = [ipv4(b"a" * 40), ipv4(b"b" * 7)]
        stream = b"".join(frameSequence(packets))
        decoder = FrameDecoder()
        out = []
        for i in range(len(stream)):
            out.extend(decoder.packets(stream[i : i + 1]))
        self.assertEqual(out, packets)

    def test_partialHeaderHeldBack(self):
        decoder = FrameDecoder()
        self.assertEqual(decoder.packets(b"\x00\x00"), [])
        self.assertEqual(decoder.pending, 2)
        self.assertEqual(decoder.packets(b"\x00\x02\x45"), [])
        self.assertEqual(decoder.packets(b"\x00\x00\x00"), [b"\x45\x00"])
        self.assertEqual(decoder.pending, 2)

    def test_largestPacketAccepted(self):
        packet = b"\x45" * MAX_PACKET
        self.assertEqual(FrameDecoder().packets(frame(packet)), [packet])

    def test_oversizeRefusedFromHeaderAlone(self):
        """
        The length prefix is enough: the decoder does not wait for 4 GB.
        """
        decoder = FrameDecoder()
        self.assertRaises(FrameTooLarge, decoder.packets, struct.pack(">I", MAX_PACKET + 1))

    def test_oversizeAfterValidFrames(self):
        decoder = FrameDecoder()
        data = frame(ipv4()) + struct.pack(">I", 0xFFFFFFFF)
        self.assertRaises(FrameTooLarge, decoder.packets, data)

    def test_zeroLengthRefused(self):
        self.assertRaises(EmptyFrame, FrameDecoder().packets, b"\x00\x00\x00\x00")

    def test_smallerMaximum(self):
        decoder = FrameDecoder(maxLength=1500)
        self.assertRaises(FrameTooLarge, decoder.packets, frame(b"\x45" * 1501))


class RelayDecodingTests(unittest.TestCase):
    """
    The gateway's mode: whole frames out, still framed, partial ones held.
    """

    def test_wholeFramesPassThrough(self):
        stream = b"".join(frameSequence([ipv4(), ipv4(b"yy")]))
        self.assertEqual(FrameDecoder().frames(stream), stream)

    def test_partialFrameHeldUntilComplete(self):
        stream = b"".join(frameSequence([ipv4(), ipv4(b"z" * 100)]))
        decoder = FrameDecoder()
        cut = len(frame(ipv4())) + 10
        self.assertEqual(decoder.frames(stream[:cut]), stream[: len(frame(ipv4()))])
        self.assertEqual(decoder.pending, 10)
        self.assertEqual(decoder.frames(stream[cut:]), stream[len(frame(ipv4())) :])
        self.assertEqual(decoder.pending, 0)

    def test_splitAcrossManyReads(self):
        stream = b"".join(frameSequence([ipv4(bytes([i]) * 33) for i in range(30)]))
        decoder = FrameDecoder()
        out = b"".join(decoder.frames(stream[i : i + 7]) for i in range(0, len(stream), 7))
        self.assertEqual(out, stream)

    def test_clearDropsPartial(self):
        decoder = FrameDecoder()
        decoder.frames(frame(ipv4())[:-3])
        self.assertEqual(decoder.clear(), len(frame(ipv4())) - 3)
        self.assertEqual(decoder.pending, 0)

    def test_errorsInRelayMode(self):
        self.assertRaises(EmptyFrame, FrameDecoder().frames, b"\x00" * 8)
        self.assertRaises(FrameTooLarge, FrameDecoder().frames, b"\xff" * 8)


class PairTrackingTests(unittest.TestCase):
    def test_pairOfAlikeFramesAcrossReads(self):
        decoder = FrameDecoder(trackPairs=True)
        packet = ipv4()
        packet = packet[:12] + bytes([10, 0, 0, 1, 10, 0, 0, 2]) + packet[20:]
        data = frame(packet) * 3
        self.assertEqual(decoder.frames(data[:30]), data[: len(frame(packet))])
        self.assertEqual(decoder.pair, bytes([10, 0, 0, 1, 10, 0, 0, 2]))
        self.assertEqual(decoder.frames(data[30:]), data[len(frame(packet)) :])
        self.assertEqual(decoder.pair, bytes([10, 0, 0, 1, 10, 0, 0, 2]))

    def test_noPairForMixedOrNonIp(self):
        decoder = FrameDecoder(trackPairs=True)
        one = ipv4()
        other = one[:16] + bytes([9, 9, 9, 9]) + one[20:]
        decoder.frames(frame(one) + frame(other))
        self.assertIsNone(decoder.pair)
        decoder.frames(frame(b"\x00" * 24))
        self.assertIsNone(decoder.pair)

    def test_untrackedDecoderKeepsNoPair(self):
        decoder = FrameDecoder()
        decoder.frames(frame(ipv4()))
        self.assertIsNone(decoder.pair)
