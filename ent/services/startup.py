"""
What every ENT service shares at start-up: a failed start becomes one line
and a non-zero exit (in the foreground and as a daemon, with no pidfile left
behind), and the metrics endpoint and log format the options ask for.
The services' builders (L{ent.services.app}, L{ent.services.socketrelay})
wrap what they build with L{guarded}.
"""

import gc
import os

from twisted.application.service import MultiService
from twisted.internet.error import CannotListenError
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized

from ent.cli import usageExit
from ent.errors import ConfigurationError, EntError
from ent.legs.endpoints import serverEndpoint


class StartReport:
    """
    Tells a failed start to the operator the same way in the foreground
    and as a daemon, and leaves no pidfile behind.

    C{runner} is twistd's own options (C{None} outside twistd). twistd
    sends stderr to its log (or, as a daemon, to /dev/null) once the
    service is built, so the terminal's stderr is kept from before; and
    twistd's waiting daemon parent holds its status pipe open itself, so
    it waits for ever unless the child writes the pipe before it exits.
    """

    def __init__(self, runner):
        self.runner = runner
        self.terminal = None
        if runner is not None:
            self.terminal = os.dup(2)

    def started(self):
        self._closeTerminal()

    def _closeTerminal(self):
        if self.terminal is not None:
            os.close(self.terminal)
            self.terminal = None

    def failed(self, message):
        """
        Report C{message}; return what the process should exit with.
        """
        runner = self.runner
        if runner is None:
            return message
        self._removePidfile(runner.get("pidfile"))
        if self.terminal is not None:
            os.write(self.terminal, message.encode(errors="backslashreplace") + b"\n")
            self._closeTerminal()
        pipe = runner.get("statusPipe")
        if pipe is not None:
            runner["statusPipe"] = None
            # twistd's parent prints what follows "1 " and exits 1.
            os.write(pipe, b"1 " + message.encode("ascii", "backslashreplace")[:98])
            os.close(pipe)
        return 1

    @staticmethod
    def _removePidfile(path):
        """
        Remove C{path} if it names this process: twistd wrote it before
        our start failed, and would remove it only after a clean stop.
        """
        if not path:
            return
        try:
            with open(path) as f:
                ours = f.read().strip() == str(os.getpid())
            if ours:
                os.unlink(path)
        except OSError:
            pass


class StartupGuard(MultiService):
    """
    Turn a failed start into a one-line message and a non-zero exit.

    The child has already undone what it configured; a traceback would only
    hide the reason from the operator.

    It also carries what every service shares: the metrics endpoint
    (C{extra} services) and the log observer that C{--log-format} asks for.
    """

    log = Logger()

    def __init__(self, name, child, extra=(), logObserver=None, report=None):
        MultiService.__init__(self)
        self.name = name
        self.logObserver = logObserver
        self.report = report if report is not None else StartReport(None)
        child.setServiceParent(self)
        for service in extra:
            service.setServiceParent(self)

    def setServiceParent(self, parent):
        """
        twistd's application is our parent: an L{ILogObserver} component on
        it is the observer twistd logs to (unless C{--logger} names one).
        """
        if self.logObserver is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.logObserver)
        MultiService.setServiceParent(self, parent)

    def _guarded(self, start):
        try:
            start(self)
        except (EntError, CannotListenError) as e:
            self.running = 0
            message = f"{self.name}: cannot start: {e}"
            self.log.critical("{message}", message=message)
            raise SystemExit(self.report.failed(message))

    def privilegedStartService(self):
        self._guarded(MultiService.privilegedStartService)

    def startService(self):
        self._guarded(MultiService.startService)
        self.report.started()
        # What exists once the service runs lives as long as the process:
        # out of the collector's way, a full collection no longer walks it
        # (a pause that would land on some packet's round trip).
        gc.freeze()


def _built(name, build):
    """
    Build a service; an option that only its parser could check (an
    endpoint string) is refused as a usage error, like the other options.
    """
    try:
        return build()
    except ConfigurationError as e:
        usageExit(f"twistd {name}", str(e))
    except EntError as e:
        raise SystemExit(f"twistd {name}: {e}")


# File descriptors kept free beyond the legs a gateway accepts: its
# outgoing peer connections, the metrics endpoint, logs, the library's own.
FD_RESERVE = 256


def raiseFileLimit():
    """
    Raise this process's soft limit of open files to its hard limit (a
    gateway holds one per leg, and the usual soft limit of 1024 is what a
    flood of idle connections would exhaust); returns the new soft limit.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def legsWithinFileLimit(maxLegs, limit):
    """
    C{--max-legs}, lowered if needed so that the legs can never take the
    descriptors kept in reserve.
    """
    return max(1, min(maxLegs, limit - FD_RESERVE))


def metricsListen(text):
    """
    Where C{--metrics} listens: a bare PORT on loopback only, since C{/legs}
    tells whoever asks which parties are connected; ADDR:PORT or an
    endpoint string where it says.
    """
    return f"127.0.0.1:{text}" if text.isascii() and text.isdigit() else text


def guarded(name, service, options, reactor):
    """
    Wrap C{service} in a L{StartupGuard} with the metrics endpoint and log
    format that C{options} ask for.
    """
    extra = []
    if options["metrics"] is not None:
        from ent.observability.metrics import metricsService

        extra.append(
            metricsService(serverEndpoint(reactor, metricsListen(options["metrics"]), "--metrics"), service.stats)
        )
    observer = None
    if options["log-format"] == "json":
        from ent.observability.logs import observerFor

        observer = observerFor(getattr(options, "parent", None))
    report = StartReport(getattr(options, "parent", None))
    return StartupGuard(name, service, extra, observer, report)
