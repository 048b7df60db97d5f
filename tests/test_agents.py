"""
Several agents on one host, for real: two tunnels side by side through the
same four namespaces, each pair of agents on TUNs of its own.

    client: tun0 captures port 7, tun1 captures port 8
    server: srv-a and srv_a replay both to the echo server's port 7

(srv-a and srv_a once shared an nftables table, and the second client agent
took the first's routing table: the first tunnel then stopped working while
its agents still reported it up.)
"""

import signal
import sys

from twisted.trial import unittest

from ent.testing.topology import ADDRESS, ECHOSVR, Topology, twistdCommand
from tests.checks import tempDir
from tests.netns import requireRoot

# name: (client TUN, client --dport, server TUN, client address, server address, agent port, peer port)
TUNNELS = {
    "a": ("tun0", 7, "srv-a", "192.168.0.1", "192.168.0.254", 6980, 6979),
    "b": ("tun1", 8, "srv_a", "192.168.1.1", "192.168.1.254", 6990, 6989),
}


class TwoTunnels:
    """
    ENT's services for both tunnels, and the echo server behind them.
    """

    def __init__(self, testCase, sharedGateways=False, extraArgs=lambda host, name: (), announce=None):
        """
        C{sharedGateways}: both tunnels through one gateway on each side
        (the ports of tunnel a), which routes by address; the server agents
        announce themselves, as they send nothing before they are reached.
        C{extraArgs(host, tunnel)} gives more arguments for each service.
        """
        announce = sharedGateways if announce is None else announce
        self.extraArgs = extraArgs
        self.topology = t = Topology(logdir=tempDir(testCase, "ent-agents-")).__enter__()
        testCase.addCleanup(t.destroy)
        self.shared = sharedGateways
        self.services = {}
        t.start("server", sys.executable, ECHOSVR, "server", "--host", "0.0.0.0", "--port", "7", name="echo")
        for name in ("a",) if sharedGateways else TUNNELS:
            _, _, _, _, _, agentPort, peerPort = TUNNELS[name]
            t.twistd(
                "gw2",
                "entg",
                "--entg-listen",
                str(peerPort),
                "--enta-listen",
                str(agentPort),
                *extraArgs("gw2", name),
                name=f"gw2-{name}",
            )
            t.twistd(
                "gw1",
                "entg",
                "--entg-connect",
                f"{ADDRESS['gw2']}:{peerPort}",
                "--enta-listen",
                str(agentPort),
                *extraArgs("gw1", name),
                name=f"gw1-{name}",
            )
        for name, (tun, dport, serverTun, client, server, agentPort, peerPort) in TUNNELS.items():
            t.twistd(
                "server",
                "enta",
                "--replay",
                "7",
                "--tun-name",
                serverTun,
                "--tun-addr",
                f"{server}/24",
                "--peer-addr",
                client,
                "--entg-connect",
                f"{ADDRESS['gw2.agent']}:{self.agentPort(name)}",
                *(["--announce"] if announce else []),
                *extraArgs("server", name),
                name=f"server-{name}",
            )
            self.startClient(name)
        for name in TUNNELS:
            self.waitUp(name)

    def agentPort(self, name):
        return TUNNELS["a" if self.shared else name][5]

    def startClient(self, name):
        tun, dport, _, client, server, _, _ = TUNNELS[name]
        self.services[name] = self.topology.twistd(
            "client",
            "enta",
            "--dport",
            str(dport),
            "--tun-name",
            tun,
            "--tun-addr",
            f"{client}/24",
            "--peer-addr",
            server,
            "--entg-connect",
            f"{ADDRESS['gw1.agent']}:{self.agentPort(name)}",
            *self.extraArgs("client", name),
            name=f"client-{name}",
        )

    def waitUp(self, name):
        far = TUNNELS[name][4]
        ping = lambda: self.topology.exec("client", "ping", "-c", "1", "-W", "1", far).returncode == 0
        try:
            self.topology.waitFor(ping, timeout=30)
        except TimeoutError:
            raise TimeoutError(f"tunnel {name} did not come up; logs:\n{self.logs()}")

    def echo(self, name):
        """
        A short echo on tunnel C{name}'s captured port: (passed, output).
        """
        result = self.topology.exec(
            "client",
            sys.executable,
            ECHOSVR,
            "client",
            "--host",
            ADDRESS["server"],
            "--port",
            str(TUNNELS[name][1]),
            "--bytes",
            "1000",
            "--timeout",
            "20",
            timeout=60,
        )
        return result.returncode == 0 and "content PASS" in result.stdout, result.stdout + result.stderr

    def kernelState(self, host):
        """
        Everything of ENT's in C{host}'s kernel: rules, routes, nftables.
        """
        ex = self.topology.exec
        return {
            "rules": ex(host, "ip", "rule").stdout,
            "routes": ex(host, "ip", "route", "show", "table", "all", "proto", "231").stdout,
            "nft": ex(host, "nft", "list", "ruleset").stdout,
        }

    def nftTable(self, tun):
        return self.topology.exec("client", "nft", "list", "table", "ip", f"ent_{tun}").stdout

    def rulesFor(self, port):
        return [line for line in self.kernelState("client")["rules"].splitlines() if f"dport {port} " in line]

    def enta(self, *args):
        """
        Run one more client agent that must be refused: its output.
        """
        result = self.topology.exec("client", *twistdCommand(), "-n", "--pidfile=", "enta", *args, timeout=30)
        if result.returncode == 0:
            raise AssertionError(f"enta {' '.join(args)} was not refused:\n{result.stdout}")
        return result.stdout + result.stderr

    def logs(self):
        import glob

        return "\n".join(
            f"--- {path}\n" + open(path, errors="replace").read()[-3000:]
            for path in sorted(glob.glob(f"{self.topology.logdir}/*.log"))
        )


class AgentsOnOneHostTests(unittest.TestCase):
    def setUp(self):
        requireRoot(self)
        self.tunnels = TwoTunnels(self)

    def assertBothPass(self):
        for name in TUNNELS:
            passed, output = self.tunnels.echo(name)
            self.assertTrue(passed, f"tunnel {name}: {output}\n{self.tunnels.logs()}")

    def test_bothPassTrafficAndStopLeavesTheOther(self):
        """
        Each agent has its own table and priority; stopping one leaves the
        other's rules, route and nftables table as they were, and working.
        """
        t = self.tunnels
        self.assertBothPass()
        (ruleA,), (ruleB,) = t.rulesFor(7), t.rulesFor(8)
        self.assertRegex(ruleA, r"^6978:\s.* lookup 6978 proto 231")
        self.assertRegex(ruleB, r"^6979:\s.* lookup 6979 proto 231")
        routes = t.kernelState("client")["routes"].splitlines()
        self.assertEqual(
            sorted(map(str.strip, routes)),
            [
                "default dev tun0 table 6978",
                "default dev tun1 table 6979",
                "unreachable default table 6978 metric 65535",
                "unreachable default table 6979 metric 65535",
            ],
        )
        serverTables = t.topology.exec("server", "nft", "list", "tables").stdout.split("\n")
        self.assertIn("table ip ent_srv-a", serverTables)
        self.assertIn("table ip ent_srv_a", serverTables)

        tableB = t.nftTable("tun1")
        self.assertIn('oifname "tun1" tcp dport 8 dnat to 192.168.1.254:6978', tableB)
        code, _ = t.topology.stop(t.services["a"])
        self.assertIn(code, (0, -signal.SIGTERM), t.logs())
        after = t.kernelState("client")
        self.assertEqual(t.rulesFor(7), [])
        self.assertEqual(t.rulesFor(8), [ruleB])
        self.assertEqual(
            sorted(map(str.strip, after["routes"].splitlines())),
            ["default dev tun1 table 6979", "unreachable default table 6979 metric 65535"],
        )
        self.assertNotIn("ent_tun0", after["nft"])
        self.assertEqual(t.nftTable("tun1"), tableB)
        passed, output = t.echo("b")
        self.assertTrue(passed, output + t.logs())

    def test_conflictsRefusedNamingTheOtherAgent(self):
        """
        A second agent for a captured port, another's table, a live
        agent's TUN name or another's gateway port: one line naming the
        other agent, nothing left behind and nothing of the others touched.
        """
        t = self.tunnels
        before = t.kernelState("client")
        refusals = [
            (
                ["--tun-name", "tun2", "--dport", "9,7"],
                "enta: cannot start: --dport 7 is already captured by the agent on tun0 (table 6978)",
            ),
            (
                ["--tun-name", "tun2", "--dport", "9", "--route-table", "6979"],
                "enta: cannot start: --route-table 6979 is in use by the agent on tun1 (table 6979)",
            ),
            (
                ["--tun-name", "tun1", "--dport", "9"],
                "enta: cannot start: --tun-name tun1 is in use by another running agent (nftables table ent_tun1)",
            ),
            (
                ["--tun-name", "tun2", "--dport", "6990"],
                "enta: cannot start: --dport 6990 would capture the gateway connection of the agent on tun1",
            ),
            (
                ["--tun-name", "tun2", "--dport", "9", "--entg-connect", "10.1.0.2:8"],
                "enta: cannot start: the gateway port 8 is captured by the agent on tun1 (table 6979)",
            ),
            (
                ["--tun-name", "tun2", "--dport", "6980", "--entg-connect", "10.1.0.2:6980"],
                "--dport 6980 is the gateway's port (--entg-connect): capturing it would loop",
            ),
        ]
        for args, message in refusals:
            output = t.enta(*args)
            self.assertIn(message, output)
            self.assertNotIn("Traceback", output)
            self.assertEqual(t.kernelState("client"), before, f"after {args}")
        self.assertNotIn("tun2", t.topology.exec("client", "ip", "link").stdout)
        self.assertBothPass()

    def test_killedAgentsRulesAreOnlyItsOwnToClean(self):
        """
        A killed agent's stale rules stay until an agent of the same TUN
        name starts: another agent neither removes nor reuses them.
        """
        t = self.tunnels
        code, _ = t.topology.stop(t.services["a"], signal.SIGKILL)
        self.assertEqual(code, -signal.SIGKILL)
        (stale,) = t.rulesFor(7)
        # tun1000 would take table and priority 6978 if it were free.
        third = t.topology.twistd(
            "client",
            "enta",
            "--tun-name",
            "tun1000",
            "--dport",
            "9",
            "--tun-addr",
            "192.168.2.1/24",
            "--peer-addr",
            "192.168.2.254",
            "--entg-connect",
            "10.1.0.2:7000",
            name="client-third",
        )
        t.topology.waitFor(lambda: t.rulesFor(9), timeout=15)
        (ruleThird,) = t.rulesFor(9)
        self.assertRegex(ruleThird, r"^6980:\s.* lookup 6980 proto 231")
        self.assertEqual(t.rulesFor(7), [stale])
        self.assertEqual(len(t.rulesFor(8)), 1)

        t.startClient("a")
        t.waitUp("a")
        self.assertEqual(t.rulesFor(7), [stale], "the restart reuses its table, one rule per port")
        self.assertBothPass()
        self.assertEqual(len(t.rulesFor(9)), 1)
        self.assertEqual(third.poll(), None, t.logs())
