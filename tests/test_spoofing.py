"""
What the far agent lets the tunnel reach: packets with spoofed sources, and
packets crafted to match a connection of the host that never used the
tunnel, written into the client host's TUN with a raw socket.

    client host (raw socket) ── gw1 ── gw2 (10.3.0.1) ── server host (10.3.0.2): echo :7 exposed
"""

import os
import signal
import sys

from twisted.trial import unittest

from ent.testing.topology import ADDRESS, Tunnel
from tests.checks import METRICS, assertStopsCleanly, scrapeIn
from tests.netns import requireRoot
from tests.test_engparity import BareTunnel

SERVER = ADDRESS["server"]
PEER = ADDRESS["gw2.agent"]
FAR = "192.168.0.254"

# Writes one IPv4 packet three times, its headers built here, with a raw
# socket, routed as a packet to VIA is (so into the client host's TUN):
#   VIA syn SRC DST SPORT DPORT | VIA udp SRC DST SPORT DPORT |
#   VIA unreachable SRC DST INNER_SRC INNER_DST INNER_SPORT INNER_DPORT (ICMP port unreachable of a UDP datagram)
INJECT = r"""
import socket, struct, sys

from ent.protocols.packets import checksum

def ip(src, dst, proto, payload):
    header = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, proto, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
    return header[:10] + struct.pack(">H", checksum(header)) + header[12:] + payload

def transport(src, dst, proto, segment, at):
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack(">BBH", 0, proto, len(segment))
    return segment[:at] + struct.pack(">H", checksum(pseudo + segment)) + segment[at + 2:]

def udp(src, dst, sport, dport, data=b"spoofed"):
    return transport(src, dst, 17, struct.pack(">HHHH", sport, dport, 8 + len(data), 0) + data, 6)

via, kind, src, dst, *rest = sys.argv[1:]
if kind == "syn":
    sport, dport = map(int, rest)
    segment = struct.pack(">HHIIBBHHH", sport, dport, 1000, 0, 5 << 4, 0x02, 65535, 0, 0)
    packet = ip(src, dst, 6, transport(src, dst, 6, segment, 16))
elif kind == "udp":
    sport, dport = map(int, rest)
    packet = ip(src, dst, 17, udp(src, dst, sport, dport))
else:
    innerSrc, innerDst, sport, dport = rest
    quoted = ip(innerSrc, innerDst, 17, udp(innerSrc, innerDst, int(sport), int(dport), b"hello"))[:28]
    icmp = struct.pack(">BBHI", 3, 3, 0, 0) + quoted
    packet = ip(src, dst, 1, icmp[:2] + struct.pack(">H", checksum(icmp)) + icmp[4:])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for _ in range(3):
    s.sendto(packet, (via, 0))
"""

# A connected UDP socket of the host, to a peer that never answers: it
# says whether anything reached it (data, or the error an ICMP message
# sets) within the seconds given.
HOST_SOCKET = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
s.connect((sys.argv[3], int(sys.argv[4])))
s.send(b"hello")
print("ready", flush=True)
s.settimeout(0.2)
deadline = time.monotonic() + float(sys.argv[5])
result = "untouched"
while time.monotonic() < deadline and result == "untouched":
    try:
        result = f"received {s.recv(100)!r}"
    except socket.timeout:
        pass
    except OSError as e:
        result = f"error {e.errno}"
print(result, flush=True)
"""

SINK = "import socket, sys, time; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('', 5000)); time.sleep(600)"


def nftCounter(topology, host, name):
    out = topology.exec(host, "nft", "list", "counter", "ip", "ent_tun0", name).stdout
    return int(out.split("packets ")[1].split()[0])


class SpoofingTunnel:
    """
    A tunnel whose server agent exposes the echo service on port 7, with
    metrics, and a way to write packets into it from the client host.
    """

    def __init__(self, testCase):
        requireRoot(testCase)
        self.tunnel = Tunnel(
            roleArgs={"client": ["--map", f"{SERVER}:7={FAR}:7"], "server": ["--expose", "7"]},
            hostArgs={"server": METRICS},
        ).__enter__()
        testCase.addCleanup(self.tunnel.__exit__, None, None, None)
        self.testCase = testCase
        self.t = self.tunnel.topology

    def inject(self, host, *argv, via=FAR):
        result = self.t.exec(host, sys.executable, "-c", INJECT, via, *map(str, argv), timeout=30)
        self.testCase.assertEqual(result.returncode, 0, result.stderr)

    def halfOpen(self):
        """
        The peers of the echo service's half-open connections (SYN seen).
        """
        out = self.t.exec("server", "ss", "-tnH", "state", "syn-recv", "( sport = :7 )").stdout
        return {line.split()[-1].rsplit(":", 1)[0] for line in out.splitlines() if line.strip()}

    def log(self, name):
        with open(os.path.join(self.tunnel.logdir, f"{name}.log"), errors="replace") as f:
            return f.read()


class SpoofedSourceTests(unittest.TestCase):
    """
    SYNs to the exposed service from sources the client agent may not use
    reach no service on the server host, and are counted there.
    """

    def test_spoofedSynsReachNoService(self):
        s = SpoofingTunnel(self)
        t = s.t
        # Routed elsewhere by the server host, though in the tunnel network:
        # it cannot come from the tunnel (reverse path).
        t.exec("server", "ip", "route", "add", "192.168.0.78/32", "via", PEER, check=True)
        spoofed = ["10.9.9.9", SERVER, "192.168.0.78"]
        for port, source in enumerate(spoofed, 40001):
            s.inject("client", "syn", source, FAR, port, 7)
        # Another tunnel address than the client's: the gateway learns it as
        # the client agent's, and the far agent cannot tell it from a peer's.
        # It reaches the exposed service as any tunnel peer does: the
        # control that SYNs written so do reach the service.
        s.inject("client", "syn", "192.168.0.77", FAR, 40009, 7)
        # It went the same way after them: they arrived before it.
        t.waitFor(lambda: "192.168.0.77" in s.halfOpen(), timeout=10)
        self.assertEqual(s.halfOpen(), {"192.168.0.77"}, "a SYN from a spoofed source reached the service")
        self.assertEqual(nftCounter(t, "server", "spoofed_dropped"), 3 * len(spoofed))
        t.waitFor(
            lambda: scrapeIn(t, "server").value("ent_tunnel_dropped_total", hook="spoofed") == 3 * len(spoofed),
            timeout=20,
        )
        self.assertEqual(s.tunnel.echoClient(1000).returncode, 0, "the tunnel still works")
        for host in ("client", "server"):
            rpFilter = t.exec(host, "sysctl", "-n", "net.ipv4.conf.tun0.rp_filter").stdout.strip()
            self.assertEqual(rpFilter, "1", host)
        assertStopsCleanly(self, s.tunnel)


class HostConnectionTests(unittest.TestCase):
    """
    The server host's own UDP connection to its neighbour 10.3.0.1, which
    never used the tunnel: what the tunnel sends to look like part of it
    reaches neither its socket nor its conntrack entry.
    """

    def test_hostConnectionOutOfReach(self):
        s = SpoofingTunnel(self)
        t = s.t
        t.start("gw2", sys.executable, "-c", SINK, name="sink")
        t.waitFor(lambda: ":5000" in t.exec("gw2", "ss", "-lunH").stdout)
        sockets = {}
        for name, port in (("target", 5001), ("control", 5002)):
            t.start("server", sys.executable, "-u", "-c", HOST_SOCKET, SERVER, str(port), PEER, "5000", "8", name=name)
            t.waitFor(lambda name=name: "ready" in s.log(name))
            sockets[name] = port
        before = nftCounter(t, "server", "input_dropped")
        # As the peer itself: a datagram from 10.3.0.1:5000.
        s.inject("client", "udp", PEER, SERVER, 5000, sockets["target"])
        # From the client's own tunnel address, which passes every source
        # check, to the host's LAN address: an ICMP port unreachable quoting
        # the host's datagram, which the host's conntrack would take as
        # related to that connection.
        s.inject("client", "unreachable", "192.168.0.1", SERVER, SERVER, PEER, sockets["target"], 5000)
        # The control: the same message from the peer, by the LAN, does
        # reach its socket.
        s.inject("gw2", "unreachable", PEER, SERVER, SERVER, PEER, sockets["control"], 5000, via=SERVER)
        t.waitFor(lambda: "error 111" in s.log("control"), timeout=10)
        t.waitFor(lambda: s.log("target").count("\n") >= 2, timeout=15)
        self.assertEqual(s.log("target").splitlines()[-1], "untouched", s.tunnel.logs())
        # The ICMP message met no connection in the agent's zone: dropped.
        t.waitFor(lambda: nftCounter(t, "server", "input_dropped") >= before + 3, timeout=10)
        self.assertEqual(nftCounter(t, "server", "spoofed_dropped"), 3)


class CleanupTests(unittest.TestCase):
    """
    The zone rules and counters go with the agent's table; the reverse-path
    setting with its TUN; nothing else of the host changes.
    """

    def test_killedAgentLeavesNothingAfterCleanup(self):
        s = SpoofingTunnel(self)
        t = s.t
        conf = lambda host: t.exec(host, "sysctl", "net.ipv4.conf.all", "net.ipv4.conf.default").stdout
        # gw2's namespace, made as the server's was, runs no agent.
        self.assertEqual(conf("server"), conf("gw2"))
        t.stop(s.tunnel.services["server"], signal.SIGKILL)
        s.tunnel.startService("server")
        t.waitFor(s.tunnel.tunnelUp, timeout=30)
        self.assertEqual(s.tunnel.echoClient(1000).returncode, 0, s.tunnel.logs())
        t.stop(s.tunnel.services["server"], signal.SIGKILL)
        self.assertIn("chain raw_prerouting", t.exec("server", "nft", "list", "table", "ip", "ent_tun0").stdout)
        cleanup = t.exec("server", sys.executable, "-m", "ent", "cleanup")
        self.assertEqual(cleanup.returncode, 0, cleanup.stderr)
        self.assertNotIn("server", s.tunnel.leftovers())
        self.assertEqual(conf("server"), conf("gw2"))


class BareAgentTests(unittest.TestCase):
    """
    A bare agent installs no rule, so it says at start that the tunnel
    reaches every listener of its host; its TUN filters the reverse path.
    """

    def test_bareAgentWarnsAndFiltersTheReversePath(self):
        requireRoot(self)
        tunnel = BareTunnel().__enter__()
        self.addCleanup(tunnel.__exit__, None, None, None)
        t = tunnel.topology
        self.assertEqual(tunnel.logs().count("every listener of this host is reachable through the tunnel"), 2)
        for host in ("client", "server"):
            rpFilter = t.exec(host, "sysctl", "-n", "net.ipv4.conf.tun0.rp_filter").stdout.strip()
            self.assertEqual(rpFilter, "1", host)
        # The server host routes 10.9.9.9 to its neighbour: from the tunnel
        # it is spoofed, and the kernel drops it before any socket sees it.
        t.exec("server", "ip", "route", "add", "10.9.9.9/32", "via", PEER, check=True)
        before = _reversePathDrops(t)
        t.exec("client", sys.executable, "-c", INJECT, FAR, "syn", "10.9.9.9", FAR, "40001", "7", check=True)
        t.waitFor(lambda: _reversePathDrops(t) >= before + 3, timeout=10)
        halfOpen = t.exec("server", "ss", "-tnH", "state", "syn-recv", "( sport = :7 )").stdout
        self.assertEqual(halfOpen.strip(), "")
        assertStopsCleanly(self, tunnel)


def _reversePathDrops(topology):
    """
    The server host kernel's count of packets that failed the reverse-path check.
    """
    out = topology.exec("server", "nstat", "-asz", "TcpExtIPReversePathFilter").stdout
    return int(out.split("TcpExtIPReversePathFilter")[1].split()[0])
