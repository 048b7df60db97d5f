"""
SIGHUP re-reads the policy, as operators expect of a daemon.

The signal handler only schedules the reload in the reactor's thread; the
reload itself (L{ent.protocols.admission.Admission.reload} and the legs'
re-check) runs there like any other event.
"""

import signal


class ReloadOnHangup:
    """
    Calls a function in the reactor each time the process gets SIGHUP,
    between L{start} and L{stop}; the handler it replaced comes back on
    L{stop}.
    """

    def __init__(self, reactor, signum=signal.SIGHUP):
        self.reactor = reactor
        self.signum = signum
        self._previous = None
        self._installed = False

    def start(self, reload):
        def handler(signum, frame):
            self.reactor.callFromThread(reload)

        self._previous = signal.signal(self.signum, handler)
        self._installed = True

    def stop(self):
        if self._installed:
            signal.signal(self.signum, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False
