"""
What the agent does with its nftables table while it runs: switch the
fail-closed chain as the gateway link comes and goes, and read the drop
counters of containment for the metrics.

nft runs as a child process through the reactor, so the data path never
waits for it; commands run one at a time, in the order they were asked.
"""

import json
import shutil

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger

from ent.hostconfig import netfilter


def dropCounts(text):
    """
    {hook: packets} from C{nft -j list counters table ...}.
    """
    counts = {}
    for item in json.loads(text or "{}").get("nftables", ()):
        counter = item.get("counter")
        if counter and counter["name"] in netfilter.DROP_COUNTERS:
            counts[counter["name"].partition("_")[0]] = counter["packets"]
    return counts


class TableGuard:
    """
    The running side of one agent's table C{ent_<tunName>}; C{stats} gets
    the drop counts as C{stats.tunnelDrops}.  C{failClosed} says whether
    the table has a fail-closed chain (a capturing agent's).
    """

    log = Logger()
    interval = 5.0

    def __init__(self, tunName, stats, reactor, failClosed, nft=None):
        self.tunName = tunName
        self.stats = stats
        self.reactor = reactor
        self.failClosed = failClosed
        self.nft = nft or shutil.which("nft") or "/usr/sbin/nft"
        self._queue = succeed(None)
        self._poll = LoopingCall(self.readCounters)
        self._poll.clock = reactor
        self._reading = False

    def _run(self, argv, done):
        """
        Run nft with C{argv} after the commands before it; C{done} gets
        (stdout, stderr, exit code).  Return a Deferred that fires (with
        C{None}) once it ran, whether it succeeded or not.
        """
        run = lambda _: getProcessOutputAndValue(self.nft, argv, reactor=self.reactor)
        failed = lambda reason: self.log.error("nft did not run: {error}", error=reason.getErrorMessage())
        finished = Deferred()
        self._queue.addCallback(run).addCallbacks(done, failed).addBoth(lambda _: finished.callback(None))
        return finished

    def gateway(self, up):
        """
        Admit captured connections while the gateway is connected (C{up});
        refuse them at once (TCP reset, ICMP unreachable) while it is not.
        Return a Deferred that fires once the rules are in place.
        """
        if not self.failClosed:
            return succeed(None)

        def done(result):
            _, err, code = result
            if code != 0:
                self.log.error(
                    "nft could not {action} captured connections: {error}",
                    action="admit" if up else "refuse",
                    error=err.decode(errors="replace").strip(),
                )
            else:
                self.log.info("captured connections {state}", state="admitted" if up else "refused at once")

        return self._run(netfilter.gatewayCommand(self.tunName, up), done)

    def startCounting(self):
        self.stats.tunnelDrops = {}
        self._poll.start(self.interval, now=True)

    def stopCounting(self):
        if self._poll.running:
            self._poll.stop()

    def readCounters(self):
        if self._reading:
            return
        self._reading = True

        def done(result):
            self._reading = False
            out, _, code = result
            if code == 0:
                self.stats.tunnelDrops = dropCounts(out.decode(errors="replace"))

        argv = ["-j", "list", "counters", "table", "ip", netfilter.tableName(self.tunName)]
        self._run(argv, done)
