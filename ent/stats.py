"""
Counters for what ENT carries and drops, with drops logged in aggregate.

Per-packet work is one integer addition; logging happens at most once per
interval, never per packet.
"""

from collections import Counter

from twisted.internet.task import LoopingCall
from twisted.logger import Logger


class DropReporter:
    """
    Count dropped packets or frames by reason and log the totals
    periodically, so that nothing is lost silently and nothing floods.
    """

    log = Logger()

    def __init__(self, clock, what, interval=10.0):
        self.what = what
        self.total = Counter()
        self._unreported = Counter()
        self._loop = LoopingCall(self.report)
        self._loop.clock = clock
        self._interval = interval

    def count(self, reason, n=1):
        self.total[reason] += n
        self._unreported[reason] += n

    def start(self):
        if not self._loop.running:
            self._loop.start(self._interval, now=False)

    def stop(self):
        if self._loop.running:
            self._loop.stop()
        self.report()

    def report(self):
        """
        Log the drops since the last report, one line per reason.
        """
        for reason, n in sorted(self._unreported.items()):
            self.log.warn(
                "{what}: dropped {count} ({total} in all): {reason}",
                what=self.what,
                count=n,
                total=self.total[reason],
                reason=reason,
            )
        self._unreported.clear()
