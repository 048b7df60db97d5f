"""
The check every packet from the tunnel passes before it is written to the
TUN: a malformed packet is dropped and counted here, never handed to the
kernel.
"""

import struct

_U16 = struct.Struct(">H")


def packetProblem(packet):
    """
    Why C{packet} is not a well-formed IPv4 or IPv6 packet, or C{None}.

    The reasons are few and fixed, so they serve as drop-counter labels.
    """
    size = len(packet)
    version = packet[0] >> 4
    if version == 4:
        if size < 20:
            return "truncated IPv4 header"
        if (packet[0] & 0x0F) * 4 < 20 or (packet[0] & 0x0F) * 4 > size:
            return "bad IPv4 header length"
        if _U16.unpack_from(packet, 2)[0] != size:
            return "IPv4 total length disagrees with the frame"
        return None
    if version == 6:
        if size < 40:
            return "truncated IPv6 header"
        if _U16.unpack_from(packet, 4)[0] + 40 != size:
            return "IPv6 payload length disagrees with the frame"
        return None
    return "not an IPv4 or IPv6 packet"


def wellFormed(packets, drops):
    """
    The packets of C{packets} that pass L{packetProblem}; the others are
    counted in C{drops} by reason.
    """
    good = []
    for packet in packets:
        problem = packetProblem(packet)
        if problem is None:
            good.append(packet)
        else:
            drops.count(problem)
    return good
