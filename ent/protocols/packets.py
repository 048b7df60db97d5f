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
    (L{ent.observability.stats.DROP_REASONS} says them in words).
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


ANNOUNCE_PAYLOAD = b"ent-announce"


def announcement(address):
    """
    The packet an agent started with C{--announce} sends on connecting: an
    ICMP echo reply from its TUN address to itself. No kernel sends a
    packet to its own address into a TUN, so ENT's gateway takes it as the
    claim of C{address} and passes it on to nobody; ENG's gateway relays
    it, and the far host's kernel drops it (a reply nobody asked for, from a
    source that is not on its link).
    """
    import ipaddress

    packed = ipaddress.IPv4Address(address).packed
    icmp = bytearray(8) + ANNOUNCE_PAYLOAD  # type 0 (echo reply), code 0
    struct.pack_into(">H", icmp, 2, checksum(bytes(icmp)))
    header = bytearray(20)
    header[0] = 0x45
    struct.pack_into(">H", header, 2, 20 + len(icmp))
    header[8] = 64  # TTL
    header[9] = 1  # ICMP
    header[12:16] = packed
    header[16:20] = packed
    struct.pack_into(">H", header, 10, checksum(bytes(header)))
    return bytes(header) + bytes(icmp)


ANNOUNCE_SIZE = 20 + 8 + len(ANNOUNCE_PAYLOAD)


def isAnnouncement(data, start, length):
    """
    Whether the packet of C{length} bytes at C{start} in C{data} is an
    L{announcement} (its addresses are checked by the caller).
    """
    return (
        length == ANNOUNCE_SIZE
        and data[start] == 0x45
        and data[start + 9] == 1
        and data[start + 20] == 0
        and data[start + 28 : start + length] == ANNOUNCE_PAYLOAD
    )


def checksum(data):
    """
    The Internet checksum (RFC 1071) of C{data}.
    """
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f">{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF
