"""
The wire format shared with the original ENG: a 4-byte unsigned big-endian
length, then the raw IP packet (no TUN packet-info header).
"""

import struct

from ent.errors import EmptyFrame, FrameTooLarge

HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size
# A frame's length, then its IPv4 header's first byte and the source and
# destination addresses (as one number), for L{FrameDecoder._scanPairs}.
_FRAMED_IPV4 = struct.Struct(">IB11xQ")

# The largest IP packet: IPv4's total length and IPv6's payload length are
# 16-bit fields, and no TUN MTU exceeds 65535.
MAX_PACKET = 65535


def frameSequence(packets):
    """
    Frame C{packets} as a flat list of buffers for one C{writeSequence}.
    """
    pack = HEADER.pack
    out = []
    append = out.append
    for packet in packets:
        append(pack(len(packet)))
        append(packet)
    return out


def frame(packet):
    """
    Frame a single packet as one C{bytes}.
    """
    return HEADER.pack(len(packet)) + packet


class FrameDecoder:
    """
    Reassemble frames from a byte stream that arrives in arbitrary pieces.

    A length of zero or above C{maxLength} cannot be resynchronised, so it
    raises a L{ent.errors.FramingError}; the caller drops the connection.
    """

    def __init__(self, maxLength=MAX_PACKET, trackPairs=False):
        self.maxLength = maxLength
        self._buffer = bytearray()
        # Whole frames returned so far, for the leg's counters.
        self.completed = 0
        # With trackPairs, frames() also tells in pair the source and
        # destination addresses (concatenated) that every frame it just
        # returned shares, or None: a router then routes a bulk flow's batch
        # once, not frame by frame.
        self.trackPairs = trackPairs
        self.pair = None

    @property
    def pending(self):
        """
        Bytes held back because they do not yet form a whole frame.
        """
        return len(self._buffer)

    def _scan(self, buffer):
        """
        Return the offset just past the last whole frame in C{buffer},
        checking every length prefix on the way.
        """
        offset = 0
        count = 0
        end = len(buffer)
        unpack = HEADER.unpack_from
        maxLength = self.maxLength
        while end - offset >= HEADER_SIZE:
            (length,) = unpack(buffer, offset)
            if length == 0:
                raise EmptyFrame("frame with length 0")
            if length > maxLength:
                raise FrameTooLarge(f"frame of {length} bytes exceeds the maximum of {maxLength}")
            if end - offset - HEADER_SIZE < length:
                break
            offset += HEADER_SIZE + length
            count += 1
        self.completed += count
        return offset

    def _scanPairs(self, buffer):
        """
        L{_scan}, and set L{pair}: the source and destination address that
        every IPv4 frame it passes has (from one address to another: an
        announcement's are equal), or C{None}.  One C{unpack} per frame reads
        the length, the first byte and both addresses, so a bulk flow's batch
        costs little more than a plain scan.
        """
        offset = 0
        count = 0
        end = len(buffer)
        unpack = HEADER.unpack_from
        unpackIpv4 = _FRAMED_IPV4.unpack_from
        maxLength = self.maxLength
        first = pair = None
        alike = True
        while end - offset >= HEADER_SIZE:
            if alike and end - offset >= _FRAMED_IPV4.size:
                length, byte0, addresses = unpackIpv4(buffer, offset)
            else:
                (length,) = unpack(buffer, offset)
                byte0 = None
            if length == 0:
                raise EmptyFrame("frame with length 0")
            if length > maxLength:
                raise FrameTooLarge(f"frame of {length} bytes exceeds the maximum of {maxLength}")
            if end - offset - HEADER_SIZE < length:
                break
            if alike:
                if byte0 is None or length < 20:
                    alike = False
                elif pair is None:
                    first, pair = byte0, addresses
                    alike = byte0 >> 4 == 4 and addresses >> 32 != addresses & 0xFFFFFFFF
                elif byte0 != first or addresses != pair:
                    alike = False
            offset += HEADER_SIZE + length
            count += 1
        self.completed += count
        self.pair = pair.to_bytes(8, "big") if alike and pair is not None else None
        return offset

    def packets(self, data):
        """
        Feed C{data}; return the packets of every frame it completes.
        """
        buffer = self._buffer
        buffer += data
        end = self._scan(buffer)
        if not end:
            return []
        view = memoryview(buffer)
        unpack = HEADER.unpack_from
        result = []
        offset = 0
        try:
            while offset < end:
                (length,) = unpack(view, offset)
                start = offset + HEADER_SIZE
                offset = start + length
                result.append(bytes(view[start:offset]))
        finally:
            view.release()
        del buffer[:end]
        return result

    def frames(self, data):
        """
        Feed C{data}; return the bytes of every whole frame it completes,
        still framed, as one buffer (for relaying without re-framing).
        """
        buffer = self._buffer
        scan = self._scanPairs if self.trackPairs else self._scan
        if not buffer:
            # Fast path: no partial frame held, relay slices of data as is.
            end = scan(data)
            if end == len(data):
                return data
            buffer += memoryview(data)[end:]
            return data[:end]
        buffer += data
        end = scan(buffer)
        if not end:
            return b""
        whole = bytes(buffer[:end])
        del buffer[:end]
        return whole

    def clear(self):
        """
        Discard a held partial frame; return how many bytes it had.
        """
        dropped = len(self._buffer)
        self._buffer.clear()
        return dropped
