"""
The agent's running side of its table, against a stand-in nft that
records its arguments: commands in order, counters parsed.
"""

import json
import os
import stat
import sys

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial import unittest

from ent.hostconfig.guard import TableGuard, dropCounts
from ent.observability.stats import ServiceStats

COUNTERS = {
    "nftables": [
        {"metainfo": {"version": "1.0.6"}},
        {"counter": {"family": "ip", "name": "input_dropped", "table": "ent_tun0", "packets": 3, "bytes": 180}},
        {"counter": {"family": "ip", "name": "forward_dropped", "table": "ent_tun0", "packets": 0, "bytes": 0}},
        {"counter": {"family": "ip", "name": "spoofed_dropped", "table": "ent_tun0", "packets": 2, "bytes": 80}},
    ]
}

FAKE_NFT = f"""#!{sys.executable}
import json, sys
with open(sys.argv[0] + ".calls", "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1:2] == ["-j"]:
    print({json.dumps(json.dumps(COUNTERS))})
"""


def settled(guard):
    """
    A Deferred that fires once the commands asked so far have run.
    """
    d = Deferred()
    guard._queue.addBoth(lambda result: d.callback(None) or result)
    return d


class TableGuardTests(unittest.TestCase):
    def setUp(self):
        path = os.path.join(self.mktemp())
        os.makedirs(path)
        self.nft = os.path.join(path, "nft")
        with open(self.nft, "w") as f:
            f.write(FAKE_NFT)
        os.chmod(self.nft, stat.S_IRWXU)
        self.stats = ServiceStats("enta", reactor)

    def calls(self):
        with open(self.nft + ".calls") as f:
            return [json.loads(line) for line in f]

    def test_dropCounts(self):
        self.assertEqual(dropCounts(json.dumps(COUNTERS)), {"input": 3, "forward": 0, "spoofed": 2})
        self.assertEqual(dropCounts(""), {})

    def test_gatewaySwitchesInOrder(self):
        guard = TableGuard("tun0", self.stats, reactor, failClosed=True, nft=self.nft)
        guard.gateway(up=True)
        guard.gateway(up=False)
        guard.gateway(up=True)

        def check(_):
            calls = self.calls()
            self.assertEqual(calls[0], ["flush chain ip ent_tun0 fail_closed"])
            self.assertTrue(calls[1][0].startswith("flush chain ip ent_tun0 fail_closed; add rule"))
            self.assertEqual(calls[2], calls[0])
            self.assertEqual(len(calls), 3)

        return settled(guard).addCallback(check)

    def test_noFailClosedChainNoCommand(self):
        guard = TableGuard("tun0", self.stats, reactor, failClosed=False, nft=self.nft)
        guard.gateway(up=False)
        self.assertFalse(os.path.exists(self.nft + ".calls"))

    def test_countersReadIntoTheStats(self):
        guard = TableGuard("tun0", self.stats, reactor, failClosed=False, nft=self.nft)
        guard.startCounting()
        self.addCleanup(guard.stopCounting)

        def check(_):
            self.assertEqual(self.calls(), [["-j", "list", "counters", "table", "ip", "ent_tun0"]])
            self.assertEqual(self.stats.tunnelDrops, {"input": 3, "forward": 0, "spoofed": 2})

        return settled(guard).addCallback(check)
