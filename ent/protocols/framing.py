"""
The wire format shared with the original ENG: a 4-byte unsigned big-endian
length, then the raw IP packet (no TUN packet-info header).
"""

import struct

from ent.errors import EmptyFrame, FrameTooLarge
from ent.protocols.packets import ANNOUNCE_SIZE

HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size

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
        L{_scan}, and set L{pair}: the addresses of the frames it passes if
        they are all alike (IP, and not an announcement's length).
        """
        offset = 0
        count = 0
        end = len(buffer)
        unpack = HEADER.unpack_from
        maxLength = self.maxLength
        pair = None
        alike = True
        while end - offset >= HEADER_SIZE:
            (length,) = unpack(buffer, offset)
            if length == 0:
                raise EmptyFrame("frame with length 0")
            if length > maxLength:
                raise FrameTooLarge(f"frame of {length} bytes exceeds the maximum of {maxLength}")
            if end - offset - HEADER_SIZE < length:
                break
            if alike:
                start = offset + HEADER_SIZE
                version = buffer[start] >> 4
                if length == ANNOUNCE_SIZE:
                    alike = False
                elif version == 4 and length >= 20:
                    key = buffer[start + 12 : start + 20]
                elif version == 6 and length >= 40:
                    key = buffer[start + 8 : start + 40]
                else:
                    alike = False
                if alike:
                    if pair is None:
                        pair = key
                    elif key != pair:
                        alike = False
            offset += HEADER_SIZE + length
            count += 1
        self.completed += count
        self.pair = bytes(pair) if alike and pair is not None else None
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
