"""
The TUN device: created with IFF_TUN | IFF_NO_PI, configured with pyroute2
(L{ent.hostconfig.interface}, in a child process), and read by the reactor as a
L{FileDescriptor}.

The rest of ENT sees a narrow interface: batches of packets (and their size
in bytes) come out through a callback, batches go in through L{TunTransport.writePackets}, and the
reader is an L{IPushProducer} so that a full outgoing leg pauses it.
"""

import errno
import fcntl
import os
import socket
import struct

from twisted.internet.abstract import FileDescriptor
from twisted.logger import Logger

from ent.errors import EntError, PrivilegeError, TunError
from ent.hostconfig.netfilter import records, tableName
from ent.observability.stats import TunStats

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFNAMSIZ = 16

# Packets read per wakeup at most, so one busy TUN cannot starve the reactor.
DEFAULT_BATCH = 64
# Bytes read per wakeup at most: 64 packets of 64 KB would hold 4 MB (and
# as much again while framed and written), for no gain in throughput.
DEFAULT_BATCH_BYTES = 256 * 1024


def interfaceExists(name):
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def _agentOn(name):
    """
    Whether an agent's nftables table is there for C{name}: with the
    interface present, that agent is running (its TUN dies with it).
    """
    try:
        return name in records()
    except EntError:
        return False


def openTun(name):
    """
    Create the TUN interface C{name}; return its non-blocking fd.

    The device is not persistent: it disappears with the fd, so a killed
    agent leaves no TUN behind.
    """
    if not name or len(name.encode()) >= IFNAMSIZ:
        raise TunError(f"invalid TUN name {name!r} (1 to {IFNAMSIZ - 1} bytes)")
    if interfaceExists(name):
        if _agentOn(name):
            raise TunError(
                f"--tun-name {name} is in use by another running agent "
                f"(nftables table {tableName(name)}); choose another --tun-name"
            )
        raise TunError(
            f"an interface named {name} already exists (another agent's, another program's, "
            f"or a stale device): give this agent another --tun-name; only if nothing uses "
            f"{name} any more, remove it with 'ip link del {name}'"
        )
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TunError("/dev/net/tun is missing: load the tun kernel module")
    except PermissionError:
        raise PrivilegeError("cannot open /dev/net/tun: run as root (CAP_NET_ADMIN)")
    try:
        request = struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI)
        fcntl.ioctl(fd, TUNSETIFF, request)
    except OSError as e:
        os.close(fd)
        if e.errno == errno.EPERM:
            raise PrivilegeError(f"cannot create TUN {name}: run as root (CAP_NET_ADMIN)")
        raise TunError(f"cannot create TUN {name}: {e.strerror}")
    return fd


class TunTransport(FileDescriptor):
    """
    The TUN fd in the reactor: drains up to C{batch} packets per wakeup and
    hands them to C{deliver} as one list; counts into C{stats} once per
    batch, never per packet.
    """

    log = Logger()

    def __init__(
        self, fd, name, mtu, deliver, onWriteError, reactor, batch=DEFAULT_BATCH, batchBytes=DEFAULT_BATCH_BYTES
    ):
        FileDescriptor.__init__(self, reactor)
        self.stats = TunStats(batch, name)
        self._fd = fd
        self.name = name
        self._readSize = mtu
        self._deliver = deliver
        self._onWriteError = onWriteError
        self._batch = batch
        self._batchBytes = batchBytes
        self.connected = 1

    def fileno(self):
        return self._fd

    def readPackets(self):
        """
        Read what the kernel has queued, up to one batch.
        """
        return self._readBatch()[0]

    def _readBatch(self):
        """
        Up to C{batch} packets and about C{batchBytes} bytes, and their size.
        """
        packets = []
        append = packets.append
        read = os.read
        fd = self._fd
        size = self._readSize
        budget = self._batchBytes
        total = 0
        for _ in range(self._batch):
            try:
                packet = read(fd, size)
            except BlockingIOError:
                break
            append(packet)
            total += len(packet)
            if total >= budget:
                break
        return packets, total

    def doRead(self):
        try:
            packets, total = self._readBatch()
        except OSError as e:
            self.log.error("TUN {tun} read failed: {error}", tun=self.name, error=e)
            return e
        stats = self.stats
        stats.batches[len(packets)] += 1
        if packets:
            stats.packetsRead += len(packets)
            stats.bytesRead += total
            self._deliver(packets, total)
        return None

    def pauseProducing(self):
        if not self.stats.paused:
            self.stats.paused = True
            self.stats.pauses += 1
        FileDescriptor.pauseProducing(self)

    def resumeProducing(self):
        self.stats.paused = False
        FileDescriptor.resumeProducing(self)

    def writePackets(self, packets):
        """
        Write each packet to the TUN; return how many the kernel refused.

        A TUN write never blocks: the kernel takes the packet or drops it.
        """
        write = os.write
        fd = self._fd
        refused = 0
        refusedBytes = 0
        for packet in packets:
            try:
                write(fd, packet)
            except OSError as e:
                refused += 1
                refusedBytes += len(packet)
                self._onWriteError(e)
        self.stats.packetsWritten += len(packets) - refused
        self.stats.bytesWritten += sum(map(len, packets)) - refusedBytes
        return refused

    def connectionLost(self, reason):
        FileDescriptor.connectionLost(self, reason)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
