"""
Where rats-tls's blocking steps run: C{rats_tls_init} (a key pair, the
evidence) and C{rats_tls_negotiate}, each of which can take as long as a
peer or a TEE makes it.  Neither may run in the reactor's thread, and a
flood of connections must not get a thread each: a L{HandshakePool} has a
few workers and a short queue, and refuses what does not fit.

A L{Budget} bounds a whole handshake, not each socket call: when it runs
out the reactor shuts the socket down, which makes the call the library is
blocked in return, so a peer sending one byte every few seconds cannot hold
a worker.
"""

import socket
import threading
from collections import deque

from twisted.internet import defer
from twisted.python.failure import Failure

from ent.errors import HandshakeRefused, HandshakeTimeout

#: Workers of one pool, and jobs that may wait for one (beyond them a new
#: connection is closed at once).
DEFAULT_SIZE = 8
DEFAULT_QUEUE = 64


class HandshakePool:
    """
    At most C{size} worker threads, started when a job finds none free and
    ended when none is waiting, and at most C{queue} jobs waiting for one.

    Stopped by L{stop} or when the reactor stops: jobs still waiting then
    fail with L{HandshakeRefused}; running ones end with their budget.
    """

    def __init__(self, reactor, name="rats-tls", size=DEFAULT_SIZE, queue=DEFAULT_QUEUE, threadFactory=None):
        if size < 1 or queue < 0:
            raise ValueError(f"a pool needs size >= 1 and queue >= 0, not {size} and {queue}")
        self.reactor = reactor
        self.name = name
        self.size = size
        self.queue = queue
        self._threadFactory = threadFactory or threading.Thread
        self._lock = threading.Lock()
        self._pending = deque()
        self._workers = 0
        self._running = 0
        self._started = 0
        self.stopped = False
        self._trigger = reactor.addSystemEventTrigger("before", "shutdown", self.stop)

    @property
    def workers(self):
        """
        Worker threads alive now.
        """
        with self._lock:
            return self._workers

    def submit(self, function, *args, onCancel=None, onLate=None):
        """
        Run C{function(*args)} in a worker.

        @param onCancel: called when the L{Deferred} is cancelled (to make
            the worker finish early; it still runs to its end).
        @param onLate: called in the reactor with a result that arrives
            after the L{Deferred} was cancelled, to free what it holds.
        @return: a L{Deferred} that fires in the reactor with its result, or
            fails with L{HandshakeRefused} at once if the pool cannot take it
            (stopped; every worker busy and the queue full; no worker thread
            and none can be started).
        """
        d = defer.Deferred(onCancel and (lambda _: onCancel()))
        with self._lock:
            if self.stopped:
                return defer.fail(HandshakeRefused(f"{self.name}: the handshake pool is stopped"))
            if self._running + len(self._pending) >= self.size + self.queue:
                return defer.fail(
                    HandshakeRefused(
                        f"{self.name}: all {self.size} handshake workers busy and {self.queue} connections waiting"
                    )
                )
            self._pending.append((d, function, args, onLate))
            # A worker not running a job is about to take one of the pending.
            if self._workers - self._running < len(self._pending) and self._workers < self.size:
                try:
                    self._startWorker()
                except RuntimeError as e:
                    if self._workers == 0:
                        self._pending.pop()
                        return defer.fail(HandshakeRefused(f"{self.name}: no handshake worker can be started: {e}"))
        return d

    def _startWorker(self):
        self._started += 1
        thread = self._threadFactory(target=self._work, name=f"{self.name} #{self._started}", daemon=True)
        thread.start()
        self._workers += 1

    def _work(self):
        while True:
            with self._lock:
                if not self._pending:
                    # Nothing waits: end rather than idle (threads exist only
                    # while there are handshakes).
                    self._workers -= 1
                    return
                d, function, args, onLate = self._pending.popleft()
                self._running += 1
            try:
                result = function(*args)
            except BaseException:
                result = Failure()
            with self._lock:
                self._running -= 1
            self.reactor.callFromThread(_deliver, d, result, onLate)

    def stop(self):
        """
        Take no more jobs and fail the waiting ones (in the reactor's thread).
        """
        with self._lock:
            if self.stopped:
                return
            self.stopped = True
            waiting = list(self._pending)
            self._pending.clear()
        if self._trigger is not None:
            try:
                self.reactor.removeSystemEventTrigger(self._trigger)
            except (KeyError, ValueError):
                pass  # the trigger is what is running now
            self._trigger = None
        for d, _, _, _ in waiting:
            d.errback(HandshakeRefused(f"{self.name}: the handshake pool stopped"))


def _deliver(d, result, onLate):
    if not d.called:
        (d.errback if isinstance(result, Failure) else d.callback)(result)
    elif onLate is not None and not isinstance(result, Failure):
        onLate(result)


class Budget:
    """
    The time one handshake may take in all, from its acceptance (or its
    connect) to an established session.

    The socket, once there is one, is shut down when the budget runs out:
    the library's blocked C{recv} or C{send} then returns and the handshake
    fails.  The socket is not closed here, so its fd is never reused under
    the library; whoever owns it closes it after the worker is done.
    """

    def __init__(self, clock, seconds, what):
        self.seconds = seconds
        self.what = what
        self.expired = False
        self._lock = threading.Lock()
        self._sock = None
        self._timer = clock.callLater(seconds, self._expire)

    def _expire(self):
        with self._lock:
            self.expired = True
            if self._sock is not None:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already gone: the handshake fails anyway

    def attach(self, sock):
        """
        Shut C{sock} down when the budget runs out (at once if it has).
        """
        with self._lock:
            self._sock = sock
            if self.expired:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def detach(self):
        """
        Before the socket is closed by a worker: never shut down a closed fd.
        """
        with self._lock:
            self._sock = None

    def check(self):
        """
        In a worker, between steps: raise L{HandshakeTimeout} if the budget ran out.
        """
        if self.expired:
            raise self.error()

    def error(self):
        return HandshakeTimeout(f"{self.what}: no rats-tls handshake within {self.seconds:g}s")

    def cancel(self):
        """
        Run out now (the handshake is no longer wanted).
        """
        if self._timer.active():
            self._timer.cancel()
            self._expire()

    def finish(self):
        """
        In the reactor, when the worker is done: stop the timer.

        @return: whether the budget had run out (the socket is shut down).
        """
        if self._timer.active():
            self._timer.cancel()
        return self.expired
