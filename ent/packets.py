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

    The reasons are few and fixed, so they serve as drop-counter labels
    (L{ent.stats.DROP_REASONS} says them in words).
    """
    size = len(packet)
    version = packet[0] >> 4
    if version == 4:
        if size < 20:
            return "truncated_ipv4_header"
        if (packet[0] & 0x0F) * 4 < 20 or (packet[0] & 0x0F) * 4 > size:
            return "bad_ipv4_header_length"
        if _U16.unpack_from(packet, 2)[0] != size:
            return "ipv4_length_mismatch"
        return None
    if version == 6:
        if size < 40:
            return "truncated_ipv6_header"
        if _U16.unpack_from(packet, 4)[0] + 40 != size:
            return "ipv6_length_mismatch"
        return None
    return "not_ip"


def wellFormed(packets, drops, leg="gateway"):
    """
    The packets of C{packets} that pass L{packetProblem}; the others are
    counted in C{drops} by reason, against the C{leg} they came from.
    """
    good = []
    for packet in packets:
        problem = packetProblem(packet)
        if problem is None:
            good.append(packet)
        else:
            drops.count(problem, leg=leg)
    return good
