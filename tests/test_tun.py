"""
The TUN device for real, in a namespace of the test's own: created,
configured, drained in batches, paused as a producer, and written to.
"""

import socket
import struct
import subprocess

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from ent import tun
from ent.errors import TunError
from ent.hostconfig import steps as hostconfig
from ent.hostconfig.interface import configureTun
from ent.protocols.packets import checksum
from tests.netns import enterNewNamespace


def icmpEcho(source, destination, ident, payload):
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + payload
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(icmp),
        0,
        0,
        64,
        1,
        0,
        socket.inet_aton(source),
        socket.inet_aton(destination),
    )
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + icmp


class TunTransportTests(unittest.TestCase):
    def setUp(self):
        enterNewNamespace(self)
        self.batches = []
        self.writeErrors = []
        fd = tun.openTun("enttun0")
        self.tun = tun.TunTransport(
            fd, "enttun0", 1500, lambda packets, size: self.batches.append(packets), self.writeErrors.append, reactor
        )
        self.addCleanup(self._close)
        configureTun("enttun0", "192.168.0.1", 24, 1500)

    def _close(self):
        self.tun.stopReading()
        self.tun.connectionLost(None)

    def sendUdp(self, count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        for i in range(count):
            sock.sendto(b"ENT%05d" % i, ("192.168.0.254", 9))

    def test_configured(self):
        out = subprocess.run(["ip", "-o", "addr", "show", "dev", "enttun0"], capture_output=True, text=True).stdout
        self.assertIn("192.168.0.1/24", out)
        link = subprocess.run(["ip", "-o", "link", "show", "dev", "enttun0"], capture_output=True, text=True).stdout
        self.assertIn("mtu 1500", link)
        self.assertIn("UP", link)

    def test_nameInUseRefused(self):
        e = self.assertRaises(TunError, tun.openTun, "enttun0")
        self.assertIn("already exists", str(e))
        # What the user can do, without advising to delete another agent's TUN.
        self.assertIn("give this agent another --tun-name", str(e))
        self.assertIn("only if nothing uses enttun0 any more, remove it with 'ip link del enttun0'", str(e))

    @defer.inlineCallbacks
    def test_drainsInBoundedBatches(self):
        self.sendUdp(200)
        self.tun.startReading()
        for _ in range(100):
            if sum(p[0] >> 4 == 4 for b in self.batches for p in b) >= 200:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        # The kernel may add IPv6 link-local chatter of its own; count ours.
        packets = [p for batch in self.batches for p in batch if p[0] >> 4 == 4]
        self.assertEqual(len(packets), 200)
        self.assertTrue(all(len(b) <= tun.DEFAULT_BATCH for b in self.batches))
        self.assertGreater(max(map(len, self.batches)), 1, "expected several packets per wakeup")
        self.assertEqual(packets[0][0] >> 4, 4)
        self.assertEqual(packets[0][9], socket.IPPROTO_UDP)
        self.assertEqual(packets[7][-8:], b"ENT00007")

    def test_batchBoundedInBytes(self):
        """
        Large packets end a batch early: about C{batchBytes} per wakeup,
        whatever the count, and the stats follow.
        """
        self.tun._batchBytes = 1000
        self.sendUdp(30)  # 36 bytes each
        packets = self.tun.readPackets()
        self.assertEqual(len(packets), 28, "1000 bytes are reached at the 28th packet")
        self.tun.doRead()
        self.assertEqual(self.tun.stats.packetsRead, 2)
        self.assertEqual(self.tun.stats.bytesRead, 72)
        self.assertEqual(self.tun.stats.batches[2], 1)

    @defer.inlineCallbacks
    def test_pausedProducerReadsNothing(self):
        self.tun.startReading()
        self.tun.pauseProducing()
        self.sendUdp(5)
        yield task.deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(self.batches, [])
        self.tun.resumeProducing()
        yield task.deferLater(reactor, 0.2, lambda: None)
        ours = [p for b in self.batches for p in b if p[0] >> 4 == 4]
        self.assertEqual(len(ours), 5)

    @defer.inlineCallbacks
    def test_writtenPacketReachesTheKernel(self):
        """
        An ICMP echo request written to the TUN is answered by the kernel,
        and the reply comes back out of the TUN.
        """
        self.tun.startReading()
        request = icmpEcho("192.168.0.254", "192.168.0.1", 0x4E54, b"ent-tun-test")
        self.assertEqual(self.tun.writePackets([request]), 0)
        for _ in range(100):
            if self.batches:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        replies = [p for b in self.batches for p in b if p[9] == 1 and p[20] == 0]
        self.assertEqual(len(replies), 1)
        self.assertEqual(replies[0][12:16], socket.inet_aton("192.168.0.1"))
        self.assertEqual(replies[0][16:20], socket.inet_aton("192.168.0.254"))
        self.assertTrue(replies[0].endswith(b"ent-tun-test"))


class HostConfigTests(unittest.TestCase):
    """
    The pyroute2 steps run in a child process (in this test's namespace)
    and report ENT's errors as they were raised.
    """

    def setUp(self):
        enterNewNamespace(self)

    def test_configuresInTheChild(self):
        fd = tun.openTun("enttun1")
        self.addCleanup(__import__("os").close, fd)
        hostconfig.run("tun", name="enttun1", address="192.168.7.1", prefixlen=24, mtu=9000)
        out = subprocess.run(["ip", "-o", "addr", "show", "dev", "enttun1"], capture_output=True, text=True).stdout
        self.assertIn("192.168.7.1/24", out)
        policy = hostconfig.run("policy-plan", name="enttun1", ports=[7, 8], table=7000, gatewayPort=6980)
        self.assertEqual(policy, {"table": 7000, "priority": 7000})
        hostconfig.run("policy-up", name="enttun1", ports=[7, 8], **policy)
        rules = subprocess.run(["ip", "rule"], capture_output=True, text=True).stdout
        for port in (7, 8):
            self.assertIn(f"7000:\tfrom all iif lo ipproto tcp dport {port} lookup 7000 proto 231", rules)
        hostconfig.run("policy-down", name="enttun1", table=7000)
        rules = subprocess.run(["ip", "rule"], capture_output=True, text=True).stdout
        self.assertNotIn("lookup 7000", rules)

    def test_errorComesBackTyped(self):
        e = self.assertRaises(
            TunError, hostconfig.run, "tun", name="nosuch0", address="192.168.7.1", prefixlen=24, mtu=1500
        )
        self.assertEqual(str(e), "cannot configure nosuch0: no such interface")
