"""
The netfilter rule plan: what ENT asks nft to do, without running it.
"""

from twisted.trial import unittest

from ent import netfilter
from ent.errors import ConfigurationError


class RulePlanTests(unittest.TestCase):
    def test_captureRedirectsOnlyWhatIsRoutedIntoTheTun(self):
        plan = netfilter.CapturePlan("tun0", (7,), "192.168.0.254", 6978)
        rules = netfilter.rulesFor(plan)
        self.assertIn("type nat hook output priority -100", rules)
        self.assertIn('oifname "tun0" tcp dport 7 dnat to 192.168.0.254:6978', rules)
        self.assertNotIn("prerouting", rules)

    def test_captureSeveralPortsUsesASet(self):
        plan = netfilter.CapturePlan("tun0", (7, 80), "192.168.0.254", 6978)
        self.assertIn("tcp dport { 7, 80 } dnat", netfilter.rulesFor(plan))

    def test_replayRedirectsTunnelPortFromTheTun(self):
        rules = netfilter.rulesFor(netfilter.ReplayPlan("tun0", 7, 6978))
        self.assertIn("type nat hook prerouting priority -100", rules)
        self.assertIn('iifname "tun0" tcp dport 6978 redirect to :7', rules)
        self.assertNotIn("hook output", rules)

    def test_installReplacesStaleTableAtomically(self):
        """
        One transaction: create-if-missing, delete, create: a stale table of
        a killed agent is replaced, and a fresh start does not fail.
        """
        script = netfilter.installScript(netfilter.ReplayPlan("tun0", 7, 6978))
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
        record = netfilter.AgentRecord(6979, 6980, 6981)
        plan = netfilter.CapturePlan("tun1", (7,), "192.168.0.254", 6978, record)
        self.assertIn('comment "ent-agent route-table=6979 priority=6980 gateway-port=6981"',
                      netfilter.rulesFor(plan))
        self.assertEqual(netfilter.AgentRecord.fromComment(record.comment()), record)
        self.assertEqual(netfilter.AgentRecord.fromComment("ent-agent gateway-port=6980"),
                         netfilter.AgentRecord(gatewayPort=6980))
        self.assertIsNone(netfilter.AgentRecord.fromComment("the user's own"))
