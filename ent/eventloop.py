"""
ENT's reactor: Twisted's epoll reactor with a shorter path from
C{epoll_wait} to C{doRead}.

Every packet through the tunnel wakes each of ENT's processes once, so
what the reactor does per ready descriptor is paid once per process per
packet. Twisted's epoll reactor wraps each C{doRead} in
C{log.callWithLogger}, which builds a fresh legacy log context (a dict
copy, four nested calls) only so that a legacy C{log.msg} during the read
is tagged with the connection's prefix; ENT logs through
C{twisted.logger.Logger} with structured fields and never reads that
context. Here a descriptor that is only readable goes straight to its
C{doRead}; an exception from it is still logged with the context and
still disconnects the descriptor, and every other event (writable, hang-up,
error) takes Twisted's own path unchanged. The loop around it looks at
the timers with one comparison when none is due and enters its error
handler once, not per turn.
"""

import errno
import sys
from select import EPOLLIN

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.posixbase import _NO_FILEDESC
from twisted.logger import Logger
from twisted.python import log

# epoll_wait takes milliseconds in a C int, as Twisted's timeout() says.
MAX_POLL_SECONDS = 2147483

_log = Logger()
_loopFailures = _log.failureHandler("Unexpected error in main loop")


class LeanEPollReactor(EPollReactor):
    """
    L{EPollReactor} whose read-only events skip the legacy log context.
    """

    def doPoll(self, timeout):
        if timeout is None:
            timeout = -1
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            if event != EPOLLIN:
                log.callWithLogger(selectable, self._doReadOrWrite, selectable, fd, event)
                continue
            try:
                if selectable.fileno() == -1:
                    # Closed behind the reactor's back: as Twisted does.
                    why = _NO_FILEDESC
                else:
                    why = selectable.doRead()
            except BaseException:
                why = sys.exc_info()[1]
                log.callWithLogger(selectable, log.err)
            if why:
                self._disconnectSelectable(selectable, why, True)

    doIteration = doPoll

    def mainLoop(self):
        while self._started:
            with _loopFailures:
                while self._started:
                    self.doIteration(self._runDue())
        _log.info("Main loop terminated.")

    def _runDue(self):
        """
        Run the timers and thread calls that are due; return how long the
        next poll may wait. The turn of nearly every packet has none: then
        this is one comparison, not Twisted's C{runUntilCurrent} and
        C{timeout}.
        """
        if not (self.threadCallQueue or self._newTimedCalls or self._justStopped or self._cancellations > 50):
            pending = self._pendingTimedCalls
            if not pending:
                return None if self.running else 0
            delay = pending[0].time - self.seconds()
            if delay > 0:
                return min(delay, MAX_POLL_SECONDS) if self.running else 0
        self.runUntilCurrent()
        return self.running and self.timeout()


def install():
    """
    Install L{LeanEPollReactor} as the global reactor.
    """
    from twisted.internet.main import installReactor

    reactor = LeanEPollReactor()
    installReactor(reactor)
    return reactor
