"""
C{--policy} on plain TCP and TLS legs, with real twistd processes in
namespaces this test creates (and deletes, also on failure): who may join
a gateway by source or certificate name, what an agent may reach, which
sources a peer may send from, and SIGHUP re-reading the policy.

    client ─┐                         (c2: another source on its own
    c2 ─────┴─ gw1 ── gw2 ── server    link to gw1, for strangers and
                                       squatters)

    client ── gw1 ══ gw2 ── server     (gw1 ══ gw2 on TLS; gw3 and gw4
               gw3 ══╝║                connect to gw2's peer port with
               gw4 ═══╝                a gw3 and an agent certificate)
"""

import os
import re
import signal
import sys
import time

from twisted.trial import unittest

from ent.legs import certs
from ent.testing.topology import ECHOSVR
from tests.checks import established, scrapeIn, tempDir
from tests.test_manyparties import PACED, Parties, clientLinks
from tests.test_tls import tlsArgs

AGENT_PORT = 6980
PEER_PORT = 6979

CLIENT_POLICY = """\
[[identity]]
name = "client-a"
role = "agent"
from = ["10.1.0.1/32"]
addresses = ["192.168.0.1/32"]
{services}
[[identity]]
name = "gw2"
role = "peer"
from = ["10.2.0.2/32"]
"""

SERVER_POLICY = """\
[[identity]]
name = "gw1"
role = "peer"
from = ["10.2.0.1/32"]

[[identity]]
name = "server"
role = "agent"
from = ["10.3.0.2/32"]
addresses = ["192.168.0.254/32"]
"""


def writeFile(path, text):
    # Written whole and renamed, so a SIGHUP never reads half a file.
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return path


class PolicyParties(Parties):
    """
    L{Parties} with agents of any capture and exposure, echo servers on
    any port and the checks the policy tests make.
    """

    def echoServer(self, host, port=7):
        return self.topology.start(
            host,
            sys.executable,
            ECHOSVR,
            "server",
            "--host",
            "0.0.0.0",
            "--port",
            str(port),
            name=f"{host}-echo" + ("" if port == 7 else f"{port}"),
        )

    def enta(self, host, tunAddress, gateway, *args, name=None):
        return self.topology.twistd(
            host,
            "enta",
            "--tun-addr",
            f"{tunAddress}/24",
            "--entg-connect",
            f"{gateway}:{AGENT_PORT}",
            *args,
            name=name,
        )

    def echo(self, host, size=1000, port=7, timeout=30, target="10.3.0.2"):
        command = self.echoCommand(target, size, timeout)
        command[command.index("--port") + 1] = str(port)
        return self.topology.exec(host, *command, timeout=timeout + 30)

    def assertEchoes(self, host, size=100_000, port=7):
        result = self.echo(host, size, port)
        self.testCase.assertEqual(result.returncode, 0, result.stdout + result.stderr + self.logs())
        self.assertEchoed(result.stdout, size)

    def assertNoEcho(self, host, port=7):
        result = self.echo(host, 1000, port, timeout=3)
        self.testCase.assertNotEqual(result.returncode, 0, result.stdout + self.logs())
        self.testCase.assertNotIn("received 1000 bytes", result.stdout)

    def waitEcho(self, host, port=7, timeout=30):
        """
        Until a short echo from C{host} works (a policy with services lets
        no ping through).
        """
        try:
            self.topology.waitFor(lambda: self.echo(host, 64, port, timeout=2).returncode == 0, timeout=timeout)
        except TimeoutError:
            raise AssertionError(f"{host} cannot echo through the tunnel; logs:\n{self.logs()}")

    def metric(self, host, name, **labels):
        return scrapeIn(self.topology, host).value(name, **labels)

    def connections(self, echoLog, address):
        return len(re.findall(rf"connection from {re.escape(address)}:\d+\n", self.log(echoLog)))


class PlainLegsTests(unittest.TestCase):
    """
    gw1's policy admits the agent from 10.1.0.1 only, as client-a owning
    192.168.0.1, and gw2 as its peer by source; gw2's admits gw1 and the
    server agent by source.  c2 is another host on its own link to gw1.
    """

    def start(self, services=None):
        links = (
            ("client", "10.1.0.1", "gw1", "10.1.0.2"),
            ("c2", "10.1.9.1", "gw1", "10.1.9.2"),
            ("gw1", "10.2.0.1", "gw2", "10.2.0.2"),
            ("gw2", "10.3.0.1", "server", "10.3.0.2"),
        )
        self.p = p = PolicyParties(self, ("client", "c2", "gw1", "gw2", "server"), links)
        d = p.topology.logdir
        grant = f"services = {services!r}\n".replace("'", '"') if services is not None else ""
        gw1 = writeFile(os.path.join(d, "gw1.toml"), CLIENT_POLICY.format(services=grant))
        gw2 = writeFile(os.path.join(d, "gw2.toml"), SERVER_POLICY)
        ports = (7, 9) if services is not None else (7,)
        for port in ports:
            p.echoServer("server", port)
        p.gateway("gw2", "--entg-listen", str(PEER_PORT), "--policy", gw2)
        p.gateway("gw1", "--entg-connect", f"10.2.0.2:{PEER_PORT}", "--policy", gw1)
        exposes = [a for port in ports for a in ("--expose", str(port))]
        p.enta("server", "192.168.0.254", "10.3.0.1", *exposes, "--peer-addr", "192.168.0.1")
        maps = [a for port in ports for a in ("--map", f"{port}=192.168.0.254:{port}")]
        self.client = p.enta("client", "192.168.0.1", "10.1.0.2", *maps, "--peer-addr", "192.168.0.254")
        p.waitEcho("client")
        return p

    def test_othersSourceRefused(self):
        """
        The listed agent joins and echoes; an agent from another source is
        refused before it is attached: counted, logged with the source it
        has and the one client-a wants, and nothing it sends gets through.
        """
        p = self.start()
        p.assertEchoes("client")
        p.enta(
            "c2",
            "192.168.0.2",
            "10.1.9.2",
            "--map",
            "7=192.168.0.254:7",
            "--peer-addr",
            "192.168.0.254",
            name="c2-stranger",
        )
        p.waitLog(
            "gw1-entg",
            r"agent 10\.1\.9\.1:\d+ refused by the policy: from is 10\.1\.9\.1, policy client-a wants 10\.1\.0\.1/32",
        )
        self.assertGreaterEqual(p.metric("gw1", "ent_legs_refused_total", leg="agent", reason="policy"), 1)
        p.assertNoEcho("c2")
        self.assertEqual(p.connections("server-echo", "192.168.0.2"), 0, p.log("server-echo"))
        # Never attached: only the client's leg, and the refused one never
        # counted as a connection of the agent side.
        self.assertEqual(p.metric("gw1", "ent_gateway_legs", side="agent"), 1)
        self.assertNotIn("agent connected from 10.1.9.1", p.log("gw1-entg"))
        # On plain TCP the gateway can refuse only once the connection is up:
        # the agent sees it reset as it connects, or just after.
        self.assertRegex(p.log("c2-stranger"), r"lost gateway 10\.1\.9\.2:6980|cannot connect to 10\.1\.9\.2:6980")
        # The stranger's tries did not disturb the client.
        p.assertEchoes("client")
        self.assertEqual(p.log("client-enta").count("connected to gateway"), 1, p.log("client-enta"))

    def test_squatterRefusedWhileTheOwnerIsAway(self):
        """
        With client-a's leg cut and its agent stopped, so that 192.168.0.1
        has no owner, a squatter from another source claiming it is
        refused by the policy; the real agent then reconnects and owns its
        address again.
        """
        p = self.start()
        t = p.topology
        p.assertEchoes("client")
        self.client.send_signal(signal.SIGSTOP)
        self.addCleanup(lambda: self.client.poll() is None and self.client.send_signal(signal.SIGCONT))
        killed = t.exec("gw1", "ss", "-K", "-tn", "state", "established", f"( sport = :{AGENT_PORT} )")
        self.assertEqual(killed.returncode, 0, killed.stderr)
        p.waitLog("gw1-entg", r"agent 10\.1\.0\.1:\d+ disconnected")
        self.assertEqual(p.metric("gw1", "ent_gateway_legs", side="agent"), 0)

        before = p.connections("server-echo", "192.168.0.1")
        p.enta(
            "c2",
            "192.168.0.1",
            "10.1.9.2",
            "--map",
            "7=192.168.0.254:7",
            "--peer-addr",
            "192.168.0.254",
            name="c2-squatter",
        )
        p.waitLog(
            "gw1-entg",
            r"agent 10\.1\.9\.1:\d+ refused by the policy: from is 10\.1\.9\.1, policy client-a wants 10\.1\.0\.1/32",
        )
        self.assertGreaterEqual(p.metric("gw1", "ent_legs_refused_total", leg="agent", reason="policy"), 1)
        p.assertNoEcho("c2")
        self.assertEqual(p.connections("server-echo", "192.168.0.1"), before, p.log("server-echo"))
        self.assertEqual(p.metric("gw1", "ent_gateway_legs", side="agent"), 0)
        # On plain TCP the gateway can refuse only once the connection is up:
        # the agent sees it reset as it connects, or just after.
        self.assertRegex(p.log("c2-squatter"), r"lost gateway 10\.1\.9\.2:6980|cannot connect to 10\.1\.9\.2:6980")

        self.client.send_signal(signal.SIGCONT)
        p.waitEcho("client")
        p.assertEchoes("client")
        self.assertEqual(p.log("client-enta").count("connected to gateway"), 2, p.log("client-enta"))
        self.assertEqual(p.metric("gw1", "ent_gateway_legs", side="agent"), 1)
        # The echoes since (the first that got through, and the one above).
        self.assertGreaterEqual(p.connections("server-echo", "192.168.0.1"), before + 2, p.log("server-echo"))

    def test_servicesLimitWhatTheAgentReaches(self):
        """
        client-a may reach 192.168.0.254:7/tcp only: the echo on port 7
        works, the one on port 9 (captured, exposed and listening just the
        same) does not, and gw1 counts its frames as service_not_allowed.
        """
        p = self.start(services=["192.168.0.254:7/tcp"])
        p.assertEchoes("client")
        self.assertEqual(p.metric("gw1", "ent_dropped_total", leg="agent", reason="service_not_allowed"), 0)
        p.assertNoEcho("client", port=9)
        self.assertGreater(p.metric("gw1", "ent_dropped_total", leg="agent", reason="service_not_allowed"), 0)
        self.assertNotIn("connection from", p.log("server-echo9"))
        # The agent is not refused for it: port 7 still works on the same leg.
        p.assertEchoes("client")
        self.assertEqual(p.log("client-enta").count("connected to gateway"), 1, p.log("client-enta"))


class TlsPeersTests(unittest.TestCase):
    """
    gw1 ══ gw2 on TLS, certificates from one CA; gw2's policy lists the
    peer gw1 by its certificate's name, owning 192.168.0.1 only, and the
    server agent by source.  gw3 (a gateway certificate of another name)
    and gw4 (the client agent's certificate) connect to gw2's peer port.
    """

    def setUp(self):
        links = (
            ("client", "10.1.0.1", "gw1", "10.1.0.2"),
            ("gw1", "10.2.0.1", "gw2", "10.2.0.2"),
            ("gw2", "10.3.0.1", "server", "10.3.0.2"),
            ("gw3", "10.4.0.1", "gw2", "10.4.0.2"),
            ("gw4", "10.5.0.1", "gw2", "10.5.0.2"),
        )
        self.p = p = PolicyParties(self, ("client", "gw1", "gw2", "server", "gw3", "gw4"), links)
        self.dir = d = tempDir(self, "ent-policy-tls-")
        ca = certs.makeCa(d)
        certs.makeCertificate(d, "gw1", ["10.2.0.1"], ca)
        certs.makeCertificate(d, "gw2", ["10.2.0.2", "10.4.0.2", "10.5.0.2"], ca)
        certs.makeCertificate(d, "gw3", [], ca)
        certs.makeCertificate(d, "client", [], ca)
        policy = writeFile(
            os.path.join(d, "gw2.toml"),
            """\
[[identity]]
name = "gw1"
role = "peer"
tls-names = ["gw1"]
addresses = ["192.168.0.1/32"]

[[identity]]
name = "server"
role = "agent"
from = ["10.3.0.2/32"]
addresses = ["192.168.0.254/32"]
""",
        )
        p.echoServer("server")
        p.gateway("gw2", "--entg-listen", str(PEER_PORT), *tlsArgs(d, "gw2", "--entg-tls"), "--policy", policy)
        p.gateway("gw1", "--entg-connect", f"10.2.0.2:{PEER_PORT}", *tlsArgs(d, "gw1", "--entg-tls"))
        p.enta("server", "192.168.0.254", "10.3.0.1", "--replay", "7", "--peer-addr", "192.168.0.1")

    def test_unlistedCertificatesRefusedOnThePeerPort(self):
        """
        A gateway certificate of the right CA but another name, and an
        agent's certificate, are each refused on gw2's peer port, counted
        and logged with the names they have; neither is attached, and the
        listed gw1 carries the client's echo.
        """
        p = self.p
        d = self.dir
        p.enta("client", "192.168.0.1", "10.1.0.2", "--dport", "7", "--peer-addr", "192.168.0.254")
        p.waitEcho("client")
        p.assertEchoes("client")
        p.gateway("gw3", "--entg-connect", f"10.4.0.2:{PEER_PORT}", *tlsArgs(d, "gw3", "--entg-tls"))
        p.waitLog("gw2-entg", r"peer 10\.4\.0\.1:\d+ refused by the policy: tls-names are gw3, policy gw1 wants gw1")
        p.gateway("gw4", "--entg-connect", f"10.5.0.2:{PEER_PORT}", *tlsArgs(d, "client", "--entg-tls"))
        p.waitLog("gw2-entg", r"peer 10\.5\.0\.1:\d+ refused by the policy: tls-names are client, policy gw1 wants gw1")
        self.assertGreaterEqual(p.metric("gw2", "ent_legs_refused_total", leg="peer", reason="policy"), 2)
        self.assertEqual(p.metric("gw2", "ent_gateway_legs", side="peer"), 1)
        gw2 = p.log("gw2-entg")
        self.assertNotRegex(gw2, r"peer connected from 10\.[45]\.0\.1")
        p.assertEchoes("client")

    def test_listedPeerSendingFromOutsideItsAddresses(self):
        """
        gw1 may send from 192.168.0.1 only: a client agent behind it at
        192.168.0.5 gets no echo, and gw2 drops its frames as
        source_not_allowed on the peer leg, without closing that leg.
        """
        p = self.p
        p.enta("client", "192.168.0.5", "10.1.0.2", "--dport", "7", "--peer-addr", "192.168.0.254")
        p.waitLog("client-enta", "connected to gateway")
        p.waitLog("gw2-entg", r"peer connected from 10\.2\.0\.1")
        p.assertNoEcho("client")
        self.assertGreater(p.metric("gw2", "ent_dropped_total", leg="peer", reason="source_not_allowed"), 0)
        self.assertEqual(p.connections("server-echo", "192.168.0.5"), 0, p.log("server-echo"))
        self.assertEqual(p.metric("gw2", "ent_gateway_legs", side="peer"), 1)
        self.assertEqual(p.log("gw1-entg").count("peer connected"), 1, p.log("gw1-entg"))


AGENT_B = """\
[[identity]]
name = "agent-b"
role = "agent"
from = ["10.1.2.1/32"]
addresses = ["192.168.0.2/32"]

"""

# agent-b first: agent-a's lines move when it goes, which must not matter.
WITHOUT_B = """\
[[identity]]
name = "agent-a"
role = "agent"
from = ["10.1.1.1/32"]
addresses = ["192.168.0.1/32"]

[[identity]]
name = "gw2"
role = "peer"
from = ["10.2.0.2/32"]
"""

RELOAD_POLICY = AGENT_B + WITHOUT_B


class ReloadTests(unittest.TestCase):
    """
    Two client hosts at gw1, each its own identity by source: agent-a
    (c1, 192.168.0.1) and agent-b (c2, 192.168.0.2).
    """

    def setUp(self):
        links = (*clientLinks(2), ("gw1", "10.2.0.1", "gw2", "10.2.0.2"), ("gw2", "10.3.0.1", "server", "10.3.0.2"))
        self.p = p = PolicyParties(self, ("c1", "c2", "gw1", "gw2", "server"), links)
        self.policy = writeFile(os.path.join(p.topology.logdir, "gw1.toml"), RELOAD_POLICY)
        p.echoServer("server")
        p.gateway("gw2", "--entg-listen", str(PEER_PORT))
        self.gw1 = p.gateway("gw1", "--entg-connect", f"10.2.0.2:{PEER_PORT}", "--policy", self.policy)
        p.enta("server", "192.168.0.254", "10.3.0.1", "--replay", "7", "--peer-addr", "192.168.0.1")
        for i in (1, 2):
            p.enta(f"c{i}", f"192.168.0.{i}", f"10.1.{i}.2", "--dport", "7", "--peer-addr", "192.168.0.254")
        for i in (1, 2):
            p.waitPing(f"c{i}", "192.168.0.254")

    def legOf(self, source):
        return {pair for pair in established(self.p.topology, "gw1", AGENT_PORT) if pair[1].startswith(source + ":")}

    def test_reloadClosesOnlyTheRemovedIdentity(self):
        """
        SIGHUP after agent-b's identity is removed closes agent-b's leg
        within a second, while agent-a's paced transfer goes on, on the
        same connection, and arrives whole.  A file with a syntax error, or
        with an unknown key, is not taken: the log says so, nothing is
        closed and agent-a still echoes.
        """
        p, t = self.p, self.p.topology
        a, b = self.legOf("10.1.1.1"), self.legOf("10.1.2.1")
        self.assertEqual((len(a), len(b)), (1, 1), (a, b))
        paced = t.start("c1", sys.executable, "-c", PACED, "10.3.0.2", name="c1-paced")
        p.waitLog("c1-paced", "first echo")

        writeFile(self.policy, WITHOUT_B)
        started = time.monotonic()
        self.gw1.send_signal(signal.SIGHUP)
        t.waitFor(lambda: not (self.legOf("10.1.2.1") & b), timeout=5, interval=0.01)
        latency = time.monotonic() - started
        self.assertIsNone(paced.poll(), "the transfer was over before the reload: nothing was shown")
        self.assertLess(latency, 1.0, p.logs())
        print(f"\nreload: agent-b's leg gone from ss {latency * 1000:.0f} ms after SIGHUP")
        p.waitLog(
            "gw1-entg", r"agent 10\.1\.2\.1:\d+ \(agent-b\) closed: the reloaded policy no longer admits it as it was"
        )
        self.assertEqual(p.metric("gw1", "ent_legs_refused_total", leg="agent", reason="policy_reload"), 1)

        self.assertEqual(paced.wait(timeout=60), 0, p.logs())
        p.assertEchoed(p.log("c1-paced"), 5_000_000)
        self.assertEqual(self.legOf("10.1.1.1"), a)
        self.assertEqual(p.log("c1-enta").count("connected to gateway"), 1, p.log("c1-enta"))
        # agent-b comes back and is refused: no identity is its any more.
        p.waitLog(
            "gw1-entg",
            r"agent 10\.1\.2\.1:\d+ refused by the policy: from is 10\.1\.2\.1, policy agent-a wants 10\.1\.1\.1/32",
        )
        p.assertNoEcho("c2")
        self.assertEqual(self.legOf("10.1.2.1"), set())

        broken = (
            ("[[identity]\nname = 'agent-a'\n", r"gw1\.toml:1: "),
            (RELOAD_POLICY.replace('name = "agent-a"', 'name = "agent-a"\ncolour = "blue"'), r"unknown key 'colour'"),
        )
        for count, (text, detail) in enumerate(broken, 1):
            writeFile(self.policy, text)
            self.gw1.send_signal(signal.SIGHUP)
            p.topology.waitFor(
                lambda: p.log("gw1-entg").count("policy not reloaded, the old one stays in force") == count, timeout=10
            )
            self.assertRegex(p.log("gw1-entg"), r"policy not reloaded, the old one stays in force: .*" + detail)
            self.assertEqual(self.legOf("10.1.1.1"), a)
            self.assertEqual(p.metric("gw1", "ent_legs_refused_total", leg="agent", reason="policy_reload"), 1)
            self.assertEqual(p.metric("gw1", "ent_gateway_legs", side="agent"), 1)
            self.assertEqual(p.metric("gw1", "ent_gateway_legs", side="peer"), 1)
            p.assertEchoes("c1")
            # The old policy, without agent-b, is still the one in force.
            p.assertNoEcho("c2")
        self.assertEqual(p.log("gw1-entg").count("policy reloaded from"), 1, p.log("gw1-entg"))
