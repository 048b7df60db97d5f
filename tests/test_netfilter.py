"""
The netfilter rule plan: what ENT asks nft to do, without running it.
"""

from twisted.trial import unittest

from ent.capture.mapping import Exposure, Mapping, parseExposure, parseMapping
from ent.errors import ConfigurationError
from ent.hostconfig import netfilter


def capture(ports, record=netfilter.AgentRecord()):
    """
    ENG's --dport PORT,...: TCP to the far agent's tunnel port.
    """
    mappings = tuple(Mapping("tcp", None, p, "192.168.0.254", 6978) for p in ports)
    return netfilter.AgentPlan("tun0", "192.168.0.1", mappings, (), record)


def replay(port):
    """
    ENG's --replay PORT: --expose 6978=PORT.
    """
    return netfilter.AgentPlan("tun0", "192.168.0.254", (), (Exposure("tcp", 6978, None, port),))


def lines(rules, chain):
    """
    The rules of C{chain}, without its type line.
    """
    body = rules.split(f"  chain {chain} {{\n", 1)[1].split("  }\n", 1)[0]
    return [line.strip() for line in body.splitlines() if not line.strip().startswith("type ")]


class RulePlanTests(unittest.TestCase):
    def test_captureRedirectsOnlyWhatIsRoutedIntoTheTun(self):
        rules = netfilter.rulesFor(capture((7,)))
        self.assertIn("type nat hook output priority -100", rules)
        self.assertIn('oifname "tun0" tcp dport 7 dnat to 192.168.0.254:6978', rules)
        self.assertNotIn("type nat hook prerouting", rules)

    def test_captureSeveralPortsUsesASet(self):
        self.assertIn("tcp dport { 7, 80 } dnat", netfilter.rulesFor(capture((7, 80))))

    def test_replayRedirectsTunnelPortFromTheTun(self):
        rules = netfilter.rulesFor(replay(7))
        self.assertIn("type nat hook prerouting priority -100", rules)
        self.assertIn('iifname "tun0" tcp dport 6978 redirect to :7', rules)
        self.assertNotIn("type nat hook output", rules)

    def test_installReplacesStaleTableAtomically(self):
        """
        One transaction: create-if-missing, delete, create: a stale table of
        a killed agent is replaced, and a fresh start does not fail.
        """
        script = netfilter.installScript(replay(7))
        lines = script.splitlines()
        self.assertEqual(lines[0], "add table ip ent_tun0")
        self.assertEqual(lines[1], "delete table ip ent_tun0")
        self.assertEqual(lines[2], "table ip ent_tun0 {")
        self.assertEqual(script.count("table ip"), 3)

    def test_removeTouchesOnlyOurTable(self):
        script = netfilter.removeScript("tun1")
        self.assertEqual(script, "add table ip ent_tun1\ndelete table ip ent_tun1\n")

    def test_tableNamePerTun(self):
        """
        Names that differ only in "-", "." and "_" once shared a table, and
        the second agent replaced the first's rules.
        """
        names = {netfilter.tableName(n) for n in ("ent-a.1", "ent_a_1", "ent.a-1")}
        self.assertEqual(names, {"ent_ent-a.1", "ent_ent_a_1", "ent_ent.a-1"})

    def test_tableNameRefusesWhatNftCannotName(self):
        e = self.assertRaises(ConfigurationError, netfilter.tableName, "tun@1")
        self.assertIn("--tun-name 'tun@1': nftables cannot name a table after it", str(e))

    def test_recordRoundTripsThroughTheComment(self):
        record = netfilter.AgentRecord(6979, 6980, 6981, 7003)
        self.assertIn(
            'comment "ent-agent route-table=6979 priority=6980 gateway-port=6981 zone=7003"',
            netfilter.rulesFor(capture((7,), record)),
        )
        self.assertEqual(netfilter.AgentRecord.fromComment(record.comment()), record)
        self.assertEqual(
            netfilter.AgentRecord.fromComment("ent-agent gateway-port=6980"), netfilter.AgentRecord(gatewayPort=6980)
        )
        self.assertIsNone(netfilter.AgentRecord.fromComment("the user's own"))


class ServiceRulesTests(unittest.TestCase):
    """
    --map, --expose and containment, as nft rules.
    """

    def test_mappingsEachToItsOwnPlace(self):
        mappings = tuple(
            map(parseMapping, ["10.3.0.2:80=192.168.0.254:80", "53/udp=192.168.0.254:53", "7=192.168.0.254:7"])
        )
        rules = netfilter.rulesFor(netfilter.AgentPlan("tun0", "192.168.0.1", mappings))
        self.assertEqual(
            lines(rules, "output"),
            [
                'oifname "tun0" ip daddr 10.3.0.2 tcp dport 80 dnat to 192.168.0.254:80',
                'oifname "tun0" udp dport 53 dnat to 192.168.0.254:53',
                'oifname "tun0" tcp dport 7 dnat to 192.168.0.254:7',
            ],
        )
        self.assertNotIn("type nat hook prerouting", rules)

    def test_clientAcceptsNothingNewFromTheTunnel(self):
        rules = netfilter.rulesFor(capture((7,)))
        self.assertEqual(lines(rules, "input"), ['iifname "tun0" jump from_tunnel'])
        self.assertEqual(
            lines(rules, "from_tunnel"),
            [
                "ct state established,related accept",
                "ip daddr 192.168.0.1 icmp type echo-request accept",
                'counter name "input_dropped" drop comment "ent-agent"',
            ],
        )
        self.assertEqual(
            lines(rules, "through_tunnel"),
            ["ct state established,related accept", 'counter name "forward_dropped" drop'],
        )
        self.assertIn("counter input_dropped { }", rules)

    def test_serverAcceptsOnlyExposedPorts(self):
        """
        After REDIRECT the input hook sees the service's port: containment
        matches the port the tunnel asked for, on the agent's own address.
        """
        exposures = tuple(map(parseExposure, ["80=8080", "7", "53/udp=5353"]))
        rules = netfilter.rulesFor(netfilter.AgentPlan("tun0", "192.168.0.254", (), exposures))
        self.assertEqual(
            lines(rules, "prerouting"),
            ['iifname "tun0" tcp dport 80 redirect to :8080', 'iifname "tun0" udp dport 53 redirect to :5353'],
        )
        self.assertEqual(
            lines(rules, "from_tunnel")[:4],
            [
                "ct state established,related accept",
                "ct original ip daddr 192.168.0.254 meta l4proto tcp ct original proto-dst 80 accept",
                "ct original ip daddr 192.168.0.254 meta l4proto tcp ct original proto-dst 7 accept",
                "ct original ip daddr 192.168.0.254 meta l4proto udp ct original proto-dst 53 accept",
            ],
        )
        self.assertNotIn("fail_closed", rules)
        self.assertNotIn("masquerade", rules)

    def test_exposedOnAnotherHostIsForwarded(self):
        plan = netfilter.AgentPlan("tun0", "192.168.0.254", (), (parseExposure("443=10.9.0.5:8443"),))
        rules = netfilter.rulesFor(plan)
        self.assertEqual(lines(rules, "prerouting"), ['iifname "tun0" tcp dport 443 dnat to 10.9.0.5:8443'])
        self.assertEqual(lines(rules, "postrouting"), ['iifname "tun0" ct status dnat masquerade'])
        self.assertIn(
            "ct original ip daddr 192.168.0.254 meta l4proto tcp ct original proto-dst 443 accept",
            lines(rules, "through_tunnel"),
        )

    def test_captureFromAnInterface(self):
        plan = netfilter.AgentPlan("tun0", "192.168.0.1", (parseMapping("7=192.168.0.254:7"),), captureFrom=("veth-c",))
        rules = netfilter.rulesFor(plan)
        self.assertEqual(lines(rules, "prerouting"), ['iifname "veth-c" tcp dport 7 dnat to 192.168.0.254:7'])
        self.assertEqual(lines(rules, "postrouting"), ['iifname "veth-c" oifname "tun0" masquerade'])

    def test_failClosedWhileTheGatewayIsAway(self):
        """
        Installed refusing (no gateway yet); the agent flushes and refills
        the chain as its link comes and goes.
        """
        rules = netfilter.rulesFor(capture((7,)))
        refuse = [
            'oifname "tun0" ct state new ct status dnat meta l4proto tcp reject with tcp reset',
            'oifname "tun0" ct state new ct status dnat reject',
        ]
        self.assertEqual(lines(rules, "fail_closed"), refuse)
        self.assertEqual(lines(rules, "leaving"), ['oifname "tun0" jump fail_closed'])
        self.assertIn('oifname "tun0" jump fail_closed', lines(rules, "forward"))
        self.assertEqual(netfilter.gatewayCommand("tun0", True), ["flush chain ip ent_tun0 fail_closed"])
        (down,) = netfilter.gatewayCommand("tun0", False)
        self.assertEqual(
            down.split("; "),
            ["flush chain ip ent_tun0 fail_closed"] + [f"add rule ip ent_tun0 fail_closed {rule}" for rule in refuse],
        )


class SpoofingRulesTests(unittest.TestCase):
    """
    Before conntrack: spoofed sources from the TUN dropped and counted, the
    rest in the agent's own conntrack zone, both ways.
    """

    def test_spoofedSourcesDroppedBeforeConntrack(self):
        plan = netfilter.AgentPlan("tun0", "192.168.7.1", (), (parseExposure("7"),), tunNetwork="192.168.7.0/24")
        rules = netfilter.rulesFor(plan)
        self.assertIn("type filter hook prerouting priority -300", rules)
        self.assertEqual(
            lines(rules, "raw_prerouting")[:2],
            [
                'iifname "tun0" ip saddr != 192.168.7.0/24 counter name "spoofed_dropped" drop',
                'iifname "tun0" fib saddr . iif oif missing counter name "spoofed_dropped" drop',
            ],
        )
        self.assertIn("counter spoofed_dropped { }", rules)

    def test_bothDirectionsInTheAgentsZone(self):
        rules = netfilter.rulesFor(capture((7,), netfilter.AgentRecord(zone=7003)))
        self.assertEqual(lines(rules, "raw_prerouting")[2:], ['iifname "tun0" ct zone set 7003'])
        self.assertEqual(lines(rules, "raw_output"), ['oifname "tun0" ct zone set 7003'])
        self.assertIn("type filter hook output priority -300", rules)

    def test_forwardedExposureStaysInTheHostsZone(self):
        """
        Its replies come back by another interface, in the host's zone.
        """
        plan = netfilter.AgentPlan("tun0", "192.168.0.254", (), (parseExposure("443=10.9.0.5:8443"),))
        self.assertEqual(
            lines(netfilter.rulesFor(plan), "raw_prerouting")[2:],
            ['iifname "tun0" ip daddr 192.168.0.254 tcp dport 443 return', 'iifname "tun0" ct zone set 6978'],
        )

    def test_capturedFromAnInterfaceInTheZone(self):
        plan = netfilter.AgentPlan("tun0", "192.168.0.1", (parseMapping("7=192.168.0.254:7"),), captureFrom=("vc",))
        self.assertIn('iifname "vc" tcp dport 7 ct zone set 6978', lines(netfilter.rulesFor(plan), "raw_prerouting"))

    def test_zoneFromTheIfindexNotAnothersAgents(self):
        records = {"tun1": netfilter.AgentRecord(zone=6978 + 5), "tun0": netfilter.AgentRecord(zone=6978 + 6)}
        self.assertEqual(netfilter.chooseZone("tun0", {}, ifindex=5), 6978 + 5)
        self.assertEqual(netfilter.chooseZone("tun0", records, ifindex=5), 6978 + 6, "its own stale zone is free")
        self.assertEqual(netfilter.chooseZone("tun2", records, ifindex=5), 6978 + 7)
        self.assertEqual(netfilter.chooseZone("tun0", {}, ifindex=netfilter.ZONE_SLOTS + 2), 6978 + 2)
