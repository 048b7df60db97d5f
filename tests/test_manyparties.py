"""
Issue 13's must-shows, with real processes in namespaces this test
creates (and deletes, also on failure): many agents on one gateway, a
live address defended, a gateway with two peer gateways, and
--allowed-ips on TLS legs.

    c1 ─┐                            (three client hosts, and c4 for the
    c2 ─┼─ gw1 ── gw2 ── server       impostor: one link each to gw1)
    c3 ─┤
    c4 ─┘

    c1 ─┐      ┌─ gw2 ── s254
        ├─ gw1 ┤                      (gw1 connects to both peers, each
    c2 ─┘      └─ gw3 ── s253         with the address behind it)
"""

import re
import sys

from twisted.trial import unittest

from ent.legs import certs
from ent.testing.topology import ECHOSVR, Topology
from tests.checks import METRICS, scrapeIn, sha256s, statusIn, tempDir
from tests.netns import requireRoot
from tests.test_tls import tlsArgs

MB5 = 5_000_000

# Sends 5 MB to ARGV[1]:7 in 64 kB pieces over about 6 s while reading the
# echo; says "first echo" once bytes come back, and at the end whether
# what came back is what went.
PACED = """
import hashlib, os, socket, sys, threading, time
payload = os.urandom(5_000_000)
s = socket.create_connection((sys.argv[1], 7), timeout=60)
def send():
    for i in range(0, len(payload), 65536):
        s.sendall(payload[i:i + 65536])
        time.sleep(0.08)
    s.shutdown(socket.SHUT_WR)
threading.Thread(target=send).start()
back = hashlib.sha256()
size = 0
while True:
    data = s.recv(1 << 16)
    if not data:
        break
    if size == 0:
        print("first echo", flush=True)
    size += len(data)
    back.update(data)
print(f"received {size} bytes", flush=True)
print("sha256 sent", hashlib.sha256(payload).hexdigest(), flush=True)
print("sha256 back", back.hexdigest(), flush=True)
"""


def clientLinks(count, gateway="gw1"):
    """
    Hosts c1..cN, each on a link of its own to C{gateway}: cI is 10.1.I.1,
    the gateway 10.1.I.2 on that link.
    """
    return tuple((f"c{i}", f"10.1.{i}.1", gateway, f"10.1.{i}.2") for i in range(1, count + 1))


class Parties:
    """
    A L{Topology} of client hosts, gateways and server hosts, the processes
    started in it, and what their logs say.
    """

    def __init__(self, testCase, hosts, links):
        requireRoot(testCase)
        self.topology = Topology(logdir=tempDir(testCase, "ent-parties-"), hosts=hosts, links=links)
        self.topology.__enter__()
        testCase.addCleanup(self.topology.destroy)
        self.testCase = testCase

    def echoServer(self, host):
        return self.topology.start(
            host, sys.executable, ECHOSVR, "server", "--host", "0.0.0.0", "--port", "7", name=f"{host}-echo"
        )

    def gateway(self, host, *args):
        return self.topology.twistd(host, "entg", "--enta-listen", "6980", *args, *METRICS)

    def agent(self, host, tunAddress, peerAddress, gateway, *args, replay=False, name=None):
        """
        An agent with tunnel address C{tunAddress} that captures port 7
        towards C{peerAddress}, or (C{replay}) replays to port 7.
        """
        role = ["--replay", "7"] if replay else ["--dport", "7"]
        return self.topology.twistd(
            host,
            "enta",
            *role,
            "--tun-addr",
            f"{tunAddress}/24",
            "--peer-addr",
            peerAddress,
            "--entg-connect",
            f"{gateway}:6980",
            *args,
            name=name,
        )

    def waitPing(self, host, address, timeout=30):
        ping = lambda: self.topology.exec(host, "ping", "-c", "1", "-W", "1", address).returncode == 0
        try:
            self.topology.waitFor(ping, timeout=timeout)
        except TimeoutError:
            raise AssertionError(f"{host} cannot reach {address} through the tunnel; logs:\n{self.logs()}")

    def log(self, name):
        with open(f"{self.topology.logdir}/{name}.log", errors="replace") as f:
            return f.read()

    def waitLog(self, name, pattern, timeout=20):
        try:
            return self.topology.waitFor(lambda: re.search(pattern, self.log(name)), timeout=timeout)
        except TimeoutError:
            raise AssertionError(f"{name}.log never matched {pattern!r}; logs:\n{self.logs()}")

    def echoCommand(self, host, size, timeout=60):
        return [
            sys.executable,
            ECHOSVR,
            "client",
            "--host",
            host,
            "--port",
            "7",
            "--bytes",
            str(size),
            "--timeout",
            str(timeout),
        ]

    def assertEchoed(self, output, size):
        sent, back = sha256s(output)
        self.testCase.assertEqual(sent, back, output + self.logs())
        self.testCase.assertIn(f"received {size} bytes", output, output + self.logs())

    def sources(self, echoHost):
        """
        The source addresses the echo server on C{echoHost} was reached from.
        """
        return set(re.findall(r"connection from (192\.168\.0\.\d+):\d+", self.log(f"{echoHost}-echo")))

    def dropped(self, host, reason):
        return scrapeIn(self.topology, host).value("ent_dropped_total", leg="agent", reason=reason)

    def logs(self):
        import glob

        return "\n".join(
            f"--- {path}\n" + open(path, errors="replace").read()[-3000:]
            for path in sorted(glob.glob(f"{self.topology.logdir}/*.log"))
        )


class ManyAgentsTests(unittest.TestCase):
    """
    Three client hosts (.1, .2, .3) behind one gateway, one server agent
    (.254) behind the other; c4 stands by for an impostor claiming .1.
    """

    def setUp(self):
        links = (*clientLinks(4), ("gw1", "10.2.0.1", "gw2", "10.2.0.2"), ("gw2", "10.3.0.1", "server", "10.3.0.2"))
        self.p = p = Parties(self, ("c1", "c2", "c3", "c4", "gw1", "gw2", "server"), links)
        p.echoServer("server")
        p.gateway("gw2", "--entg-listen", "6979")
        p.gateway("gw1", "--entg-connect", "10.2.0.2:6979")
        p.agent("server", "192.168.0.254", "192.168.0.1", "10.3.0.1", replay=True)
        for i in (1, 2, 3):
            p.agent(f"c{i}", f"192.168.0.{i}", "192.168.0.254", f"10.1.{i}.2", "--announce")
        for i in (1, 2, 3):
            p.waitPing(f"c{i}", "192.168.0.254")

    def test_threeAgentsAtOnceToOneServer(self):
        """
        Each client host moves 5 MB through echo at the same time; the
        server sees the three tunnel addresses.
        """
        t = self.p.topology
        transfers = {
            f"c{i}": t.start(f"c{i}", *self.p.echoCommand("10.3.0.2", MB5), name=f"c{i}-transfer") for i in (1, 2, 3)
        }
        for host, process in transfers.items():
            self.assertEqual(process.wait(timeout=90), 0, self.p.logs())
        for host in transfers:
            self.p.assertEchoed(self.p.log(f"{host}-transfer"), MB5)
        self.assertEqual(self.p.sources("server"), {"192.168.0.1", "192.168.0.2", "192.168.0.3"})
        self.assertEqual(scrapeIn(t, "gw1").value("ent_gateway_legs", side="agent"), 3)
        for reason in ("no_route", "source_not_owned", "address_in_use"):
            self.assertEqual(self.p.dropped("gw1", reason), 0, reason)

    def test_impostorRefusedWhileTheOwnerTransfers(self):
        """
        A fourth agent claiming 192.168.0.1 while c1 is mid-transfer is
        refused, the refusal naming both; c1's transfer completes intact
        on the same gateway connection.
        """
        p, t = self.p, self.p.topology
        paced = t.start("c1", sys.executable, "-c", PACED, "10.3.0.2", name="c1-paced")
        p.waitLog("c1-paced", "first echo")
        p.agent("c4", "192.168.0.1", "192.168.0.254", "10.1.4.2", "--announce", name="c4-impostor")
        refusal = p.waitLog(
            "gw1-entg",
            r"agent 10\.1\.4\.1:\d+ refused: it sends from 192\.168\.0\.1, "
            r"which 10\.1\.1\.1:\d+ owns",
        )
        self.assertIsNone(paced.poll(), "the transfer was over before the refusal: nothing was shown")
        self.assertEqual(paced.wait(timeout=60), 0, p.logs())
        output = p.log("c1-paced")
        p.assertEchoed(output, MB5)
        self.assertEqual(p.log("c1-enta").count("connected to gateway"), 1, p.log("c1-enta"))
        self.assertGreaterEqual(p.dropped("gw1", "address_in_use"), 1)
        self.assertIn("10.1.4.1", refusal.group(0))
        # The owner still holds its address: the server's answers reach it.
        p.waitPing("c1", "192.168.0.254", timeout=5)


class TwoPeerGatewaysTests(unittest.TestCase):
    """
    gw1 connects to gw2 (server .254 behind it) and gw3 (server .253).
    """

    def setUp(self):
        links = (
            *clientLinks(2),
            ("gw1", "10.2.0.1", "gw2", "10.2.0.2"),
            ("gw1", "10.4.0.1", "gw3", "10.4.0.2"),
            ("gw2", "10.3.0.1", "s254", "10.3.0.2"),
            ("gw3", "10.5.0.1", "s253", "10.5.0.2"),
        )
        self.p = p = Parties(self, ("c1", "c2", "gw1", "gw2", "gw3", "s254", "s253"), links)
        for server in ("s254", "s253"):
            p.echoServer(server)
        p.gateway("gw2", "--entg-listen", "6979")
        p.gateway("gw3", "--entg-listen", "6979")
        p.gateway(
            "gw1",
            "--entg-connect",
            "10.2.0.2:6979=192.168.0.254/32",
            "--entg-connect",
            "10.4.0.2:6979=192.168.0.253/32",
        )
        p.agent("s254", "192.168.0.254", "192.168.0.1", "10.3.0.1", replay=True)
        p.agent("s253", "192.168.0.253", "192.168.0.2", "10.5.0.1", replay=True)
        p.agent("c1", "192.168.0.1", "192.168.0.254", "10.1.1.2")
        p.agent("c2", "192.168.0.2", "192.168.0.253", "10.1.2.2")

    def test_eachClientReachesTheServerBehindItsPeer(self):
        p = self.p
        # gw1 may find gw3 not yet listening and retry its connection: a
        # ping meanwhile would be dropped as no_route, rightly, and counted.
        for peer in ("10.2.0.2", "10.4.0.2"):
            p.waitLog("gw1-entg", rf"peer connected from {re.escape(peer)}:6979")
        p.waitPing("c1", "192.168.0.254")
        p.waitPing("c2", "192.168.0.253")
        for host in ("c1", "c2"):
            result = p.topology.exec(host, *p.echoCommand("10.9.9.9", 100_000), timeout=90)
            self.assertEqual(result.returncode, 0, result.stdout + result.stderr + p.logs())
            p.assertEchoed(result.stdout, 100_000)
        self.assertEqual(p.sources("s254"), {"192.168.0.1"})
        self.assertEqual(p.sources("s253"), {"192.168.0.2"})
        self.assertEqual(scrapeIn(p.topology, "gw1").value("ent_gateway_legs", side="peer"), 2)
        code, status = statusIn(p.topology, "gw1")
        self.assertEqual(code, 0, status)
        self.assertRegex(status, r"peer +10\.2\.0\.2:6979 +- +192\.168\.0\.254/32 ")
        self.assertRegex(status, r"peer +10\.4\.0\.2:6979 +- +192\.168\.0\.253/32 ")
        self.assertEqual(p.dropped("gw1", "no_route"), 0)
        # Nothing of it went on from one peer to the other.
        self.assertEqual(scrapeIn(p.topology, "gw1").value("ent_dropped_total", leg="peer", reason="peer_to_peer"), 0)


class AllowedIpsOnTlsTests(unittest.TestCase):
    """
    gw1 takes agents on TLS and lists client-a=192.168.0.1/32 only: c2's
    agent, with a certificate of the same CA that is not listed, is
    refused; c1's frames from another address are dropped and counted.
    """

    def setUp(self):
        links = (*clientLinks(2), ("gw1", "10.2.0.1", "gw2", "10.2.0.2"), ("gw2", "10.3.0.1", "server", "10.3.0.2"))
        self.p = p = Parties(self, ("c1", "c2", "gw1", "gw2", "server"), links)
        self.dir = d = tempDir(self, "ent-parties-tls-")
        ca = certs.makeCa(d)
        certs.makeCertificate(d, "gw1", [], ca)
        for name in ("client-a", "stranger"):
            certs.makeCertificate(d, name, [], ca)
        p.echoServer("server")
        p.gateway("gw2", "--entg-listen", "6979")
        p.gateway(
            "gw1",
            "--entg-connect",
            "10.2.0.2:6979",
            *tlsArgs(d, "gw1", "--enta-tls"),
            "--allowed-ips",
            "client-a=192.168.0.1/32",
        )
        p.agent("server", "192.168.0.254", "192.168.0.1", "10.3.0.1", replay=True)
        for host, name in (("c1", "client-a"), ("c2", "stranger")):
            p.agent(
                host,
                f"192.168.0.{host[1]}",
                "192.168.0.254",
                f"10.1.{host[1]}.2",
                *tlsArgs(d, name, "--entg-tls"),
                "--entg-tls-name",
                "gw1",
            )

    def test_unlistedRefusedAndForeignSourceDropped(self):
        p, t = self.p, self.p.topology
        p.waitPing("c1", "192.168.0.254")
        p.waitLog("gw1-entg", r"agent 10\.1\.2\.1:\d+ \(stranger\) refused: no --allowed-ips entry names it")
        self.assertGreaterEqual(p.dropped("gw1", "identity_not_allowed"), 1)
        self.assertNotEqual(t.exec("c2", "ping", "-c", "1", "-W", "1", "192.168.0.254").returncode, 0)

        # c1 sends from an address outside client-a's prefix: dropped, counted,
        # and c1 is not refused for it.
        before = p.dropped("gw1", "source_not_owned")
        tun = t.exec("c1", "ip", "-o", "link", "show", "type", "tun").stdout.split(":")[1].strip()
        t.exec("c1", "ip", "addr", "add", "192.168.0.9/32", "dev", tun).check_returncode()
        lost = t.exec("c1", "ping", "-c", "3", "-i", "0.2", "-W", "1", "-I", "192.168.0.9", "192.168.0.254")
        self.assertNotEqual(lost.returncode, 0, lost.stdout)
        self.assertEqual(p.dropped("gw1", "source_not_owned") - before, 3)
        result = t.exec("c1", *p.echoCommand("10.3.0.2", 100_000), timeout=90)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr + p.logs())
        p.assertEchoed(result.stdout, 100_000)
        self.assertEqual(p.log("c1-enta").count("connected to gateway"), 1, p.log("c1-enta"))
