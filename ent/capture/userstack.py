"""
The user-space capture: libslirp speaks TCP/IP inside the agent's process,
so an agent needs no TUN, no netfilter and no root.

To the rest of the agent it looks like L{ent.tun.TunTransport}: batches of
IP packets (and their size) come out through a callback, batches go in
through L{UserStack.writePackets}, and it is an L{IPushProducer} that a full
leg pauses.  Inside, slirp sees an Ethernet link: every packet gets a
14-byte header on the way in and loses it on the way out, and ARP is
answered here with made-up addresses (slirp learns MACs only from ARP).

Client role (C{--listen}): slirp's own address is the agent's tunnel
address; each listen is a slirp host forward, so a local connection becomes
a flow from the tunnel address to the far service.  Server role
(C{--expose}): slirp's own address is another one (it cannot forward its
own), the tunnel address is a guest forward to a Unix socket of ours, and
a socket relay connects each flow to the local service.  Restricted mode:
nothing else is reachable from the tunnel in either role.  UDP never
reaches slirp: L{ent.capture.userudp.UdpFlows} carries it.
"""

import errno
import os
import select
import shutil
import socket
import struct
import tempfile
import time

from twisted.internet.abstract import FileDescriptor
from twisted.logger import Logger

from ent.capture import slirp
from ent.capture.userudp import UdpFlows, internetChecksum
from ent.errors import UserStackError
from ent.observability.stats import TunStats

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
# Ethernet header of every packet handed to slirp: slirp reads only the
# ethertype, but a broadcast destination and a made-up source are honest.
_ETHER_IPV4 = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + struct.pack(">H", ETHERTYPE_IPV4)
# slirp's poll bits and epoll's, both ways.
POLL_IN, POLL_OUT, POLL_PRI, POLL_ERR, POLL_HUP = 1, 2, 4, 8, 16
_TO_EPOLL = ((POLL_IN, select.EPOLLIN), (POLL_OUT, select.EPOLLOUT), (POLL_PRI, select.EPOLLPRI))
_FROM_EPOLL = (
    (select.EPOLLIN, POLL_IN),
    (select.EPOLLOUT, POLL_OUT),
    (select.EPOLLPRI, POLL_PRI),
    (select.EPOLLERR, POLL_ERR),
    (select.EPOLLHUP, POLL_HUP),
)
# Output batches counted in the histogram: a slirp cycle may emit more.
BATCH_BUCKETS = 64
# slirp hard-codes a listen backlog of 1: every other SYN of a burst would
# be lost and cost a second.
LISTEN_BACKLOG = 1024


def fakeMac(address):
    """
    The MAC this side makes up for C{address} (packed IPv4): 02:00 + IP.
    """
    return b"\x02\x00" + address


def arpPacket(op, senderMac, senderIp, targetMac, targetIp, destination):
    return (
        destination
        + senderMac
        + struct.pack(">H", ETHERTYPE_ARP)
        + struct.pack(">HHBBH", 1, ETHERTYPE_IPV4, 6, 4, op)
        + senderMac
        + senderIp
        + targetMac
        + targetIp
    )


def _epollMask(events, paused):
    mask = 0
    for bit, flag in _TO_EPOLL:
        if events & bit:
            mask |= flag
    if paused:
        mask &= ~select.EPOLLIN
    return mask


class UserStack(FileDescriptor):
    """
    One slirp instance in the reactor: an epoll object holding slirp's
    sockets is this reader's fd; a timer runs slirp's TCP timers.

    C{interface} is the agent's tunnel address (an L{ipaddress.IPv4Interface});
    C{listens} are L{ent.services.Listen}s (client role), C{exposures}
    L{ent.services.Exposure}s (server role); C{deliver(packets, size)}
    takes the packets slirp sends into the tunnel; C{drops} counts what is
    refused.
    """

    log = Logger()

    def __init__(self, interface, mtu, deliver, drops, reactor, listens=(), exposures=(), clock=time.monotonic_ns):
        FileDescriptor.__init__(self, reactor)
        self.interface = interface
        self.mtu = min(mtu, slirp.MAX_MTU)
        self.listens = tuple(listens)
        self.exposures = tuple(exposures)
        self.stats = TunStats(BATCH_BUCKETS, "")
        self.drops = drops
        self._deliver = deliver
        self._clock = clock
        self._epoll = None
        self._slirp = None
        self._registered = {}
        self._polled = []
        self._revents = {}
        self._out = []
        self._outSize = 0
        self._arp = []
        self._known = set()
        self._timer = None
        self._busy = False
        self._guestErrors = 0
        self._epollFailed = False
        self.udp = None
        self.socketDir = None
        self.connected = 0

    # Start and stop

    def start(self):
        """
        Create the stack and its forwards; on failure nothing is left.
        """
        self.ffi, self.lib, self.libc, self.version = slirp.load()
        try:
            self._epoll = select.epoll()
            self._create()
            self._forward()
            self.udp = UdpFlows(
                self.interface,
                self.mtu,
                self._emit,
                self.drops,
                self.reactor,
                listens=[item for item in self.listens if item.proto == "udp"],
                exposures=[item for item in self.exposures if item.proto == "udp"],
            )
            self.udp.start()
        except BaseException:
            self.close()
            raise
        self.connected = 1
        self.reactor.addReader(self)
        self._cycle(readable=False)

    def _create(self):
        ffi, lib = self.ffi, self.lib
        network = self.interface.network
        own = self.interface.ip
        client = not self.exposures
        # In the server role the tunnel address is a guest forward, which
        # slirp refuses on its own address: slirp takes the network address.
        vhost = own if client else network.network_address
        config = ffi.new("SlirpConfig *")
        config.version = 4
        config.restricted = 1
        config.in_enabled = True
        config.vnetwork = slirp.inAddr(ffi, network.network_address)[0]
        config.vnetmask = slirp.inAddr(ffi, network.netmask)[0]
        config.vhost = slirp.inAddr(ffi, vhost)[0]
        config.in6_enabled = False
        # Unused (no DHCP, no DNS) but required inside the network; any
        # other address could be a far agent's.
        config.vdhcp_start = config.vhost
        config.vnameserver = config.vhost
        config.if_mtu = self.mtu
        config.if_mru = self.mtu
        config.disable_host_loopback = True
        config.disable_dns = True
        config.disable_dhcp = True
        self._callbacks = callbacks = ffi.new("SlirpCb *")
        self._keep = [
            self._callback("SlirpWriteCb", self._sendPacket, -1),
            self._callback("void(*)(const char *, void *)", self._guestError),
            self._callback("int64_t(*)(void *)", self._clockNs, 0),
            self._callback("void *(*)(SlirpTimerCb, void *, void *)", self._noTimer),
            self._callback("void(*)(void *, void *)", self._ignore),
            self._callback("void(*)(void *, int64_t, void *)", self._ignore),
            self._callback("void(*)(int, void *)", self._ignore),
            self._callback("void(*)(int, void *)", self._unregisterFd),
            self._callback("void(*)(void *)", self._ignore),
            self._callback("void(*)(Slirp *, void *)", self._ignore),
            self._callback("void *(*)(SlirpTimerId, void *, void *)", self._noTimer),
        ]
        (
            callbacks.send_packet,
            callbacks.guest_error,
            callbacks.clock_get_ns,
            callbacks.timer_new,
            callbacks.timer_free,
            callbacks.timer_mod,
            callbacks.register_poll_fd,
            callbacks.unregister_poll_fd,
            callbacks.notify,
            callbacks.init_completed,
            callbacks.timer_new_opaque,
        ) = self._keep
        self._addPoll = self._callback("SlirpAddPollCb", self._addPollFd, -1)
        self._getRevents = self._callback("SlirpGetREventsCb", self._reventsOf, 0)
        # All of it lives as long as the Slirp: slirp keeps what it is given,
        # not a copy (LIBSLIRP.md).
        self._config = config
        self._slirp = lib.slirp_new(config, callbacks, ffi.NULL)
        if self._slirp == ffi.NULL:
            raise UserStackError(f"libslirp refused the configuration (address {self.interface}, mtu {self.mtu})")

    def _forward(self):
        ffi, lib = self.ffi, self.lib
        for listen in self.listens:
            if listen.proto != "tcp":
                continue
            before = self._pollingFds()
            result = lib.slirp_add_hostfwd(
                self._slirp,
                0,
                slirp.inAddr(ffi, listen.address)[0],
                listen.port,
                slirp.inAddr(ffi, listen.tunAddress)[0],
                listen.tunPort,
            )
            if result < 0:
                raise UserStackError(
                    f"{listen.flag}: cannot listen on {listen.address}:{listen.port} (in use or not allowed)"
                )
            for fd in self._pollingFds() - before:
                _widenBacklog(fd)
        if any(e.proto == "tcp" for e in self.exposures):
            removeStaleSocketDirs()
            self.socketDir = tempfile.mkdtemp(prefix=f"{SOCKET_DIR_PREFIX}{os.getpid()}-")
        for exposure in self.exposures:
            if exposure.proto != "tcp":
                continue
            path = self.socketPath(exposure)
            guest = slirp.inAddr(ffi, self.interface.ip)
            if lib.slirp_add_unix(self._slirp, path.encode(), guest, exposure.tunPort) < 0:
                raise UserStackError(f"{exposure.flag}: libslirp refused the forward")

    def _pollingFds(self):
        self._polled = []
        timeout = self.ffi.new("uint32_t *", 1000)
        self.lib.slirp_pollfds_fill(self._slirp, timeout, self._addPoll, self.ffi.NULL)
        return {fd for fd, _ in self._polled}

    def socketPath(self, exposure):
        """
        The Unix socket slirp connects the flows for C{exposure} to.
        """
        return os.path.join(self.socketDir, f"{exposure.tunPort}.sock")

    def close(self):
        """
        Free the stack, close its sockets and remove the socket directory.
        """
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.udp is not None:
            self.udp.stop()
        if self.connected:
            self.reactor.removeReader(self)
            self.connected = 0
        if self._slirp is not None and self._slirp != self.ffi.NULL:
            slirp_ = self._slirp
            self._slirp = None
            self.lib.slirp_cleanup(slirp_)
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        if self.socketDir is not None:
            shutil.rmtree(self.socketDir, ignore_errors=True)
            self.socketDir = None

    def connectionLost(self, reason):
        self.close()

    def stopReading(self):
        self.pauseProducing()

    # The reactor side

    def fileno(self):
        return self._epoll.fileno() if self._epoll is not None else -1

    def doRead(self):
        self._cycle(readable=True)

    def _onTimer(self):
        self._timer = None
        self._cycle(readable=True)

    def _cycle(self, readable):
        """
        One turn of slirp's loop: hand it what its sockets have, run its
        timers, flush what it sent, and poll again.
        """
        if self._slirp is None:
            return
        self._revents = dict(self._epoll.poll(0)) if readable else {}
        self._busy = True
        try:
            self.lib.slirp_pollfds_poll(self._slirp, 0, self._getRevents, self.ffi.NULL)
            # Events are consumed: a second poll must not see them again
            # (an accept on an empty listener would block the reactor).
            self._revents = {}
            self._answerArp()
        finally:
            self._revents = {}
            self._busy = False
        self._fill()
        self._flush()

    def _fill(self):
        timeout = self.ffi.new("uint32_t *", 1000)
        self._polled = []
        self.lib.slirp_pollfds_fill(self._slirp, timeout, self._addPoll, self.ffi.NULL)
        wanted = {}
        for fd, events in self._polled:
            mask = _epollMask(events, self.stats.paused)
            if mask:
                # An fd with nothing to wait for stays out of epoll, which
                # would report its hang-up or error again and again.
                wanted[fd] = wanted.get(fd, 0) | mask
        registered = self._registered
        epoll = self._epoll
        for fd in [fd for fd in registered if fd not in wanted]:
            del registered[fd]
            _quietly(epoll.unregister, fd)
        for fd, mask in wanted.items():
            old = registered.get(fd)
            if old == mask:
                continue
            try:
                if old is None:
                    try:
                        epoll.register(fd, mask)
                    except FileExistsError:
                        epoll.modify(fd, mask)
                else:
                    epoll.modify(fd, mask)
            except OSError as e:
                # slirp polls only its open sockets: say it once, go on.
                if not self._epollFailed:
                    self._epollFailed = True
                    self.log.error("cannot poll a libslirp socket (fd {fd}): {error}", fd=fd, error=e)
                continue
            registered[fd] = mask
        delay = timeout[0] / 1000.0
        if self._timer is not None and self._timer.active():
            self._timer.reset(delay)
        else:
            self._timer = self.reactor.callLater(delay, self._onTimer)

    def _flush(self):
        if not self._out:
            return
        packets, size = self._out, self._outSize
        self._out, self._outSize = [], 0
        stats = self.stats
        stats.batches[min(len(packets), BATCH_BUCKETS)] += 1
        stats.packetsRead += len(packets)
        stats.bytesRead += size
        self._deliver(packets, size)

    # The tunnel side

    def writePackets(self, packets):
        """
        Hand C{packets} from the tunnel to slirp; count what it cannot take.
        """
        if self._slirp is None:
            self.drops.count("tun_closed", len(packets), leg="gateway")
            return len(packets)
        lib, s = self.lib, self._slirp
        header = _ETHER_IPV4
        own = self.interface.ip.packed
        refused = 0
        written = 0
        self._busy = True
        try:
            for packet in packets:
                if packet[0] >> 4 != 4:
                    refused += 1
                    continue
                if packet[9] == 17:
                    self.udp.packetFromTunnel(packet)
                    written += len(packet)
                    continue
                if packet[9] == 1 and packet[16:20] == own and self._echoReply(packet):
                    continue
                source = packet[12:16]
                if source not in self._known:
                    self._learn(source)
                frame = header + packet
                lib.slirp_input(s, frame, len(frame))
                written += len(packet)
            self._answerArp()
        finally:
            self._busy = False
        if refused:
            self.drops.count("not_ipv4", refused, leg="gateway")
        self.stats.packetsWritten += len(packets) - refused
        self.stats.bytesWritten += written
        self._fill()
        self._flush()
        return refused

    def _emit(self, packet):
        """
        Send one packet made outside slirp (UDP) into the tunnel: now, or
        with the batch being built.
        """
        self._out.append(packet)
        self._outSize += len(packet)
        if not self._busy:
            self._flush()

    def _echoReply(self, packet):
        """
        Answer a ping to the tunnel address, as a TUN agent's kernel does
        (slirp answers only its own address, which in the server role is
        another one); C{False} if C{packet} is not an echo request.
        """
        start = (packet[0] & 0x0F) * 4
        if len(packet) < start + 8 or packet[start] != 8 or packet[6] & 0x3F or packet[7]:
            return False
        icmp = bytearray(packet[start:])
        icmp[0] = 0
        icmp[2:4] = b"\0\0"
        icmp[2:4] = struct.pack(">H", internetChecksum(bytes(icmp)))
        header = bytearray(packet[:start])
        header[12:16], header[16:20] = packet[16:20], packet[12:16]
        header[8] = 64
        header[10:12] = b"\0\0"
        header[10:12] = struct.pack(">H", internetChecksum(bytes(header)))
        reply = bytes(header) + bytes(icmp)
        self._out.append(reply)
        self._outSize += len(reply)
        return True

    def _learn(self, source):
        """
        Tell slirp where C{source} is before its first packet: slirp holds
        a packet for an address it has no MAC of for up to a second.
        """
        if len(self._known) >= 4096:
            self._known.clear()
        self._known.add(source)
        mac = fakeMac(source)
        gratuitous = arpPacket(1, mac, source, b"\0" * 6, source, b"\xff" * 6)
        self.lib.slirp_input(self._slirp, gratuitous, len(gratuitous))

    def _answerArp(self):
        """
        Feed slirp the answers to the ARP requests it sent; the packets it
        held for them leave at the next poll, which this runs at once.
        """
        for _ in range(4):
            if not self._arp:
                return
            answers, self._arp = self._arp, []
            for answer in answers:
                self.lib.slirp_input(self._slirp, answer, len(answer))
            self.lib.slirp_pollfds_poll(self._slirp, 0, self._getRevents, self.ffi.NULL)

    # Producer

    def pauseProducing(self):
        """
        Read no more from the local sockets (the leg is full); slirp's
        timers and writes to local sockets go on.
        """
        if not self.stats.paused:
            self.stats.paused = True
            self.stats.pauses += 1
            if self.udp is not None:
                self.udp.pauseProducing()
            if self._slirp is not None and not self._busy:
                self._fill()

    def resumeProducing(self):
        if self.stats.paused:
            self.stats.paused = False
            if self.udp is not None:
                self.udp.resumeProducing()
            if self._slirp is not None and not self._busy:
                self._fill()

    def stopProducing(self):
        self.pauseProducing()

    # slirp's callbacks: none may raise into C

    def _callback(self, signature, function, error=None):
        return self.ffi.callback(signature, function, error=error, onerror=self._callbackFailed)

    def _callbackFailed(self, kind, value, traceback):
        self.log.error("libslirp callback failed: {error!r}", error=value)

    def _sendPacket(self, buf, length, opaque):
        data = self.ffi.buffer(buf, length)[:]
        ethertype = (data[12] << 8) | data[13]
        if ethertype == ETHERTYPE_IPV4:
            packet = data[14:]
            self._out.append(packet)
            self._outSize += len(packet)
        elif ethertype == ETHERTYPE_ARP and length >= 42 and data[20:22] == b"\x00\x01":
            senderMac, senderIp, targetIp = data[22:28], data[28:32], data[38:42]
            self._arp.append(arpPacket(2, fakeMac(targetIp), targetIp, senderMac, senderIp, senderMac))
        return length

    def _guestError(self, message, opaque):
        self._guestErrors += 1
        if self._guestErrors <= 10:
            self.log.warn("libslirp: {message}", message=self.ffi.string(message).decode(errors="replace"))

    def _clockNs(self, opaque):
        return self._clock()

    def _noTimer(self, *args):
        return self.ffi.NULL

    def _ignore(self, *args):
        # Timers serve only IPv6 (off); fds are polled at each fill; a
        # notify needs nothing when we refill after each input.
        pass

    def _unregisterFd(self, fd, opaque):
        # slirp closes the fd right after, and its number is soon reused.
        if self._registered.pop(fd, None) is not None and self._epoll is not None:
            _quietly(self._epoll.unregister, fd)

    def _addPollFd(self, fd, events, opaque):
        self._polled.append((fd, events))
        return len(self._polled) - 1

    def _reventsOf(self, index, opaque):
        if not 0 <= index < len(self._polled):
            return 0
        fd, events = self._polled[index]
        happened = self._revents.get(fd, 0)
        revents = 0
        for flag, bit in _FROM_EPOLL:
            if happened & flag:
                revents |= bit
        # A hang-up is news only to a socket slirp reads: it takes any HUP
        # for an end of input, and a socket it only writes to would go back
        # to reading, never to its write that fails and closes the flow,
        # and the hang-up would be reported again at once, for ever.
        allowed = events | POLL_ERR
        if events & POLL_IN:
            allowed |= POLL_HUP
        return revents & allowed


SOCKET_DIR_PREFIX = "ent-enta-"


def removeStaleSocketDirs(root=None):
    """
    Remove the socket directories of agents of this user that died without
    their clean-up (kill -9, a crash); return their paths.
    """
    root = root or tempfile.gettempdir()
    removed = []
    for entry in os.scandir(root):
        name = entry.name
        if not name.startswith(SOCKET_DIR_PREFIX):
            continue
        pid = name[len(SOCKET_DIR_PREFIX) :].split("-", 1)[0]
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
            os.kill(int(pid), 0)
        except ValueError:
            continue
        except ProcessLookupError:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
        except OSError:
            continue
    return removed


def _widenBacklog(fd):
    """
    Give a listener slirp made a real backlog; other new fds are left alone.
    """
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.listen(LISTEN_BACKLOG)
            # An accept without a waiting connection must not block.
            os.set_blocking(fd, False)
    except OSError as e:
        if e.errno not in (errno.ENOTSOCK, errno.EINVAL):
            raise
    finally:
        sock.close()


def _quietly(call, *args):
    try:
        call(*args)
    except (OSError, ValueError):
        pass
