"""
ENT's reactor (L{ent.eventloop.LeanEPollReactor}): Twisted's own reactor
conformance tests run against it, and its two shortcuts (read events
without the legacy log context, a turn without due timers) keep what
Twisted promises.
"""

import os
import subprocess
import sys

from twisted.internet import abstract, error
from twisted.internet.test import test_core, test_fdset, test_tcp, test_threads, test_time, test_unix
from twisted.python import log
from twisted.trial import unittest

from ent import eventloop
from ent.eventloop import LeanEPollReactor

LEAN = "ent.eventloop.LeanEPollReactor"


# What ENT's reactor does differently on purpose: Twisted's tests of it do
# not apply.
DEVIATIONS = {
    "test_logPrefix": (
        "by design: a read runs without the legacy log context, so a legacy "
        "log.msg inside dataReceived is not tagged with the protocol's prefix "
        "(errors still are: ShortcutTests.test_exceptionInDoReadIsLoggedAndDisconnects)"
    ),
    "test_lostFileDescriptor": (
        "epoll forgets a descriptor closed behind its back without an event; "
        "Twisted skips this test for its EPollReactor (by class name), which ENT's reactor extends"
    ),
}


def _onLeanReactor(builder):
    """
    Twisted's test cases of C{builder}, for ENT's reactor only.
    """
    attributes = {"_reactors": [LEAN], "__module__": __name__}
    for name, reason in DEVIATIONS.items():
        if hasattr(builder, name):
            attributes[name] = _skipped(getattr(builder, name), reason)
    onLean = type(builder.__name__, (builder,), attributes)
    return onLean.makeTestCaseClasses()


def _skipped(method, reason):
    def skipped(self):
        return method(self)

    skipped.skip = reason
    return skipped


for _builder in (
    test_core.SystemEventTestsBuilder,
    test_time.TimeTestsBuilder,
    test_threads.ThreadTestsBuilder,
    test_fdset.ReactorFDSetTestsBuilder,
    test_tcp.TCP4ClientTestsBuilder,
    test_tcp.TCPPortTestsBuilder,
    test_tcp.TCPConnectionTestsBuilder,
    test_tcp.TCPTransportTestsBuilder,
    test_tcp.AbortConnectionTests,
    test_unix.UNIXTestsBuilder,
):
    globals().update(_onLeanReactor(_builder))
del _builder


class PipeReader(abstract.FileDescriptor):
    """
    The read end of a pipe whose C{doRead} does what the test says.
    """

    def logPrefix(self):
        return f"PipeReader,{self.fd}"

    def __init__(self, reactor, fd, onRead):
        abstract.FileDescriptor.__init__(self, reactor)
        self.fd = fd
        self.onRead = onRead
        self.lost = []
        self.connected = 1

    def fileno(self):
        return self.fd

    def doRead(self):
        return self.onRead(self)

    def connectionLost(self, reason):
        abstract.FileDescriptor.connectionLost(self, reason)
        self.lost.append(reason)
        os.close(self.fd)
        self.fd = -1


class ShortcutTests(unittest.TestCase):
    """
    The paths ENT's reactor takes apart from Twisted's, on a real epoll and
    real pipes.
    """

    def setUp(self):
        self.reactor = LeanEPollReactor()
        self.addCleanup(self.reactor._poller.close)

    def pipe(self, onRead, closeWriteEnd=True):
        readEnd, writeEnd = os.pipe()
        os.set_blocking(readEnd, False)
        if closeWriteEnd:
            self.addCleanup(os.close, writeEnd)
        reader = PipeReader(self.reactor, readEnd, onRead)
        self.reactor.addReader(reader)

        def close():
            if reader.fd >= 0:
                self.reactor.removeReader(reader)
                os.close(reader.fd)

        self.addCleanup(close)
        return reader, writeEnd

    def countLegacyContexts(self):
        calls = []
        original = eventloop.log.callWithLogger

        def counting(*args, **kwargs):
            calls.append(args[1])
            return original(*args, **kwargs)

        self.patch(eventloop.log, "callWithLogger", counting)
        return calls

    def test_readGoesStraightToDoRead(self):
        """
        A descriptor that is only readable has its C{doRead} called without
        the legacy log context around it.
        """
        got = []
        reader, writeEnd = self.pipe(lambda r: got.append(os.read(r.fd, 100)))
        contexts = self.countLegacyContexts()
        os.write(writeEnd, b"packet")
        self.reactor.doPoll(1.0)
        self.assertEqual(got, [b"packet"])
        self.assertEqual(contexts, [])
        self.assertEqual(reader.lost, [])

    def test_otherEventsTakeTwistedsPath(self):
        """
        A hang-up is handled by Twisted's own C{_doReadOrWrite}, in the
        legacy context: the reader reads what is left, then is disconnected
        as a clean close.
        """
        got = []
        reader, writeEnd = self.pipe(lambda r: got.append(os.read(r.fd, 100)), closeWriteEnd=False)
        contexts = self.countLegacyContexts()
        os.write(writeEnd, b"last")
        os.close(writeEnd)
        self.reactor.doPoll(1.0)
        self.assertEqual(got, [b"last"])
        self.assertEqual(reader.lost, [])
        self.reactor.doPoll(1.0)
        self.assertEqual(contexts, [self.reactor._doReadOrWrite] * 2)
        self.assertEqual(len(reader.lost), 1)
        self.assertIsInstance(reader.lost[0].value, error.ConnectionDone)

    def test_exceptionInDoReadIsLoggedAndDisconnects(self):
        """
        An exception from C{doRead} is logged (in the descriptor's log
        context) and disconnects that descriptor; the others are served.
        """

        def broken(reader):
            os.read(reader.fd, 100)
            raise ValueError("bad packet handler")

        got = []
        bad, badEnd = self.pipe(broken)
        prefix = bad.logPrefix()
        good, goodEnd = self.pipe(lambda r: got.append(os.read(r.fd, 100)))
        os.write(badEnd, b"x")
        os.write(goodEnd, b"y")
        events = []
        self.patch(eventloop.log, "err", lambda *a, **kw: events.append(log.context.get(log.ILogContext)["system"]))
        self.reactor.doPoll(1.0)
        self.assertEqual(events, [prefix])
        self.assertEqual(len(bad.lost), 1)
        self.assertIsInstance(bad.lost[0].value, ValueError)
        self.assertNotIn(bad, self.reactor.getReaders())
        self.assertEqual(got, [b"y"])
        self.assertEqual(good.lost, [])

    def test_doReadReturningDoneDisconnects(self):
        """
        A reason returned by C{doRead} disconnects the descriptor, as a
        clean close: what Twisted's path does for a read that found EOF.
        """
        reader, writeEnd = self.pipe(lambda r: (os.read(r.fd, 100), error.ConnectionDone())[1])
        os.write(writeEnd, b"z")
        self.reactor.doPoll(1.0)
        self.assertEqual(len(reader.lost), 1)
        self.assertIsInstance(reader.lost[0].value, error.ConnectionDone)

    def test_turnWithoutDueTimersRunsNothing(self):
        """
        A turn runs the timers that are due, in order, and none that is
        not; the poll then waits until the next one is due.
        """
        ran = []
        self.reactor.running = True
        self.assertIsNone(self.reactor._runDue())
        self.reactor.callLater(0, ran.append, "now")
        self.reactor.callLater(0, ran.append, "also now")
        self.reactor.callLater(3600, ran.append, "later")
        timeout = self.reactor._runDue()
        self.assertEqual(ran, ["now", "also now"])
        self.assertTrue(3590 < timeout <= 3600, timeout)
        timeout = self.reactor._runDue()
        self.assertEqual(ran, ["now", "also now"])
        self.assertTrue(3590 < timeout <= 3600, timeout)
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)

    def test_stoppingPollsWithoutWaiting(self):
        """
        Once the reactor stops running, a turn does not wait in the poll.
        """
        self.reactor.callLater(3600, lambda: None)
        self.reactor.running = False
        self.assertEqual(self.reactor._runDue(), 0)

    def test_threadCallsRunOnTheNextTurn(self):
        """
        A call handed in from another thread runs on the next turn, timers
        or not.
        """
        ran = []
        self.reactor.running = True
        self.reactor.callLater(3600, ran.append, "later")
        self.reactor._runDue()
        self.reactor.callFromThread(ran.append, "from thread")
        self.reactor._runDue()
        self.assertEqual(ran, ["from thread"])

    def test_cancelledTimersAreCompacted(self):
        """
        Many cancelled timers are dropped from the heap although none is
        due: the shortcut must not keep Twisted from compacting it.
        """
        self.reactor.running = True
        calls = [self.reactor.callLater(3600 + i, lambda: None) for i in range(100)]
        self.reactor._runDue()
        for call in calls[:60]:
            call.cancel()
        self.reactor._runDue()
        self.assertEqual(len(self.reactor._pendingTimedCalls), 40)

    def test_runsAsTheGlobalLoop(self):
        """
        C{run} serves timers, thread calls and descriptors until C{stop}.
        """
        got = []
        reader, writeEnd = self.pipe(lambda r: got.append(os.read(r.fd, 100)))
        self.reactor.callLater(0.01, os.write, writeEnd, b"data")
        self.reactor.callLater(
            0.02, lambda: self.reactor.callInThread(self.reactor.callFromThread, got.append, "thread")
        )
        self.reactor.callLater(0.2, self.reactor.stop)
        self.reactor.run(installSignalHandlers=False)
        self.assertEqual(got, [b"data", "thread"])


class InstallTests(unittest.TestCase):
    """
    ENT's services run on ENT's reactor unless C{--reactor} chose another.
    """

    def run_python(self, code):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout.strip()

    def test_defaultIsEntReactor(self):
        out = self.run_python(
            "from twisted.plugins.ent_plugin import _globalReactor; print(type(_globalReactor()).__name__)"
        )
        self.assertEqual(out, "LeanEPollReactor")

    def test_chosenReactorIsKept(self):
        out = self.run_python(
            "from twisted.internet import pollreactor; pollreactor.install()\n"
            "from twisted.plugins.ent_plugin import _globalReactor; print(type(_globalReactor()).__name__)"
        )
        self.assertEqual(out, "PollReactor")

    def test_listedForTwistd(self):
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        result = subprocess.run([twistd, "--help-reactors"], capture_output=True, text=True, timeout=60)
        self.assertIn("ent-epoll", result.stdout)
