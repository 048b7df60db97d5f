"""
Where a new agent's policy goes among the other agents' on the host, on a
kernel state written out by hand; the real thing runs in test_agents.
"""

from twisted.trial import unittest

from ent.errors import RoutingError
from ent.hostconfig.netfilter import AgentRecord
from ent.hostconfig.routing import Claim, HostState, PolicyRoute, planPolicy, preferredSlot


def host(*claims, records=None, tables=(), priorities=None):
    """
    A host where C{claims} are the agents' rules (each at the priority of
    its table) plus the main, local and default tables.
    """
    state = HostState(records=dict(records or {}), interfaces={"lo"})
    state.tables = {253, 254, 255, *tables}
    state.priorities = {0: {255}, 32766: {254}, 32767: {253}, **(priorities or {})}
    for claim in claims:
        state.claims[claim.table] = claim
        state.tables.add(claim.table)
        for priority in claim.priorities:
            state.priorities.setdefault(priority, set()).add(claim.table)
        if claim.alive:
            state.interfaces.add(claim.tunName)
    return state


def live(tun, table, *ports):
    return Claim(table, tun, True, list(ports), {table})


class PlanPolicyTests(unittest.TestCase):
    def test_preferredSlotStablePerName(self):
        self.assertEqual([preferredSlot(n) for n in ("tun0", "tun1", "tun12", "tun1000")], [6978, 6979, 6990, 6978])
        self.assertEqual(preferredSlot("ent-a"), preferredSlot("ent-a"))

    def test_aloneTakesItsPreferredSlot(self):
        policy, stale = planPolicy(host(), "tun0", (7,))
        self.assertEqual((policy, stale), (PolicyRoute("tun0", (7,), 6978, 6978), []))

    def test_skipsTablesAndPrioritiesInUse(self):
        state = host(live("tun9", 6978, 5432), tables={6979}, priorities={6980: {100}})
        policy, _ = planPolicy(state, "tun0", (7,))
        self.assertEqual((policy.table, policy.priority), (6981, 6981))

    def test_samePortOfALiveAgentRefused(self):
        e = self.assertRaises(RoutingError, planPolicy, host(live("tun1", 6979, 5432)), "tun0", (80, 5432))
        self.assertEqual(str(e), "--dport 5432 is already captured by the agent on tun1 (table 6979)")

    def test_explicitTableOfAnotherRefused(self):
        e = self.assertRaises(RoutingError, planPolicy, host(live("tun1", 6979, 5432)), "tun0", (7,), 6979)
        self.assertEqual(str(e), "--route-table 6979 is in use by the agent on tun1 (table 6979)")

    def test_staleRulesOfAnotherNameNeitherReusedNorRemoved(self):
        stale = Claim(6978, "tun7", False, [7], {6978})
        state = host(stale, records={"tun7": AgentRecord(6978, 6978, 6980)})
        policy, mine = planPolicy(state, "tun0", (8,))
        self.assertEqual((policy.table, policy.priority, mine), (6979, 6979, []))
        e = self.assertRaises(RoutingError, planPolicy, state, "tun0", (8,), 6978)
        self.assertIn("in use by the stopped agent on tun7 (table 6978)", str(e))

    def test_sameNameReclaimsItsStaleTable(self):
        stale = Claim(7100, "tun0", False, [7], {7100})
        state = host(stale, records={"tun0": AgentRecord(7100, 7101)})
        policy, mine = planPolicy(state, "tun0", (7,))
        self.assertEqual((policy.table, policy.priority, mine), (7100, 7100, [7100]))

    def test_gatewayConnectionsNotCaptured(self):
        state = host(live("tun1", 6979, 6980), records={"tun1": AgentRecord(6979, 6979, 6990)})
        e = self.assertRaises(RoutingError, planPolicy, state, "tun0", (), None, 6980)
        self.assertIn("the gateway port 6980 is captured by the agent on tun1 (table 6979)", str(e))
        e = self.assertRaises(RoutingError, planPolicy, state, "tun0", (6990,), None, 7000)
        self.assertEqual(str(e), "--dport 6990 would capture the gateway connection of the agent on tun1")
        self.assertEqual(planPolicy(state, "tun0", (), None, 7000), (None, []))


class RuleArgumentsTests(unittest.TestCase):
    def test_engsDportIsTcpFromThisHost(self):
        from ent.hostconfig.routing import ruleArguments

        args = ruleArguments(PolicyRoute("tun0", (7,), 6978, 6979), PolicyRoute("tun0", (7,)).rules()[0])
        self.assertEqual(
            args, dict(table=6978, priority=6979, protocol=231, iifname="lo", ip_proto=6, dport_range="7:7")
        )

    def test_mappingWithAddressFromAnInterface(self):
        from ent.hostconfig.routing import Capture, ruleArguments

        capture = Capture("udp", 53, "10.3.0.2", "vbox")
        args = ruleArguments(PolicyRoute("tun0", (53,), 6978, 6978, (capture,)), capture)
        self.assertEqual(
            (args["iifname"], args["ip_proto"], args["dst"], args["dst_len"]), ("vbox", 17, "10.3.0.2", 32)
        )


class CleanupTests(unittest.TestCase):
    def test_onlyAgentsWhoseTunIsGone(self):
        from ent.hostconfig.cleanup import leftBehind

        records = {"tun0": AgentRecord(6978, 6978), "tun1": AgentRecord(6979, 6979), "srv": AgentRecord()}
        self.assertEqual(leftBehind(records, {"lo", "tun1", "eth0"}), ["srv", "tun0"])
