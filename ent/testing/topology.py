"""
The four-host test topology in network namespaces, for the demo, the
end-to-end tests and the benchmark.

    client host ── gateway 1 ── gateway 2 ── server host
      10.1.0.1   10.1.0.2  10.2.0.1  10.2.0.2  10.3.0.1   10.3.0.2

Nothing is configured in the root namespace: the veth pairs are created
inside the namespaces, and deleting the namespaces removes everything.
A test may lay out other hosts and links the same way (C{Topology(hosts=,
links=)}), e.g. several client hosts in front of one gateway.
"""

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HOSTS = ("client", "gw1", "gw2", "server")
LINKS = (
    # (host a, address a, host b, address b)
    ("client", "10.1.0.1", "gw1", "10.1.0.2"),
    ("gw1", "10.2.0.1", "gw2", "10.2.0.2"),
    ("gw2", "10.3.0.1", "server", "10.3.0.2"),
)
# The local port a rootless client agent listens on in the tests and demo.
USER_LISTEN_PORT = 7007
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples")
ECHOSVR = os.path.join(EXAMPLES, "echosvr.py")

ADDRESS = {
    "client": "10.1.0.1",
    "gw1.agent": "10.1.0.2",
    "gw1": "10.2.0.1",
    "gw2": "10.2.0.2",
    "gw2.agent": "10.3.0.1",
    "server": "10.3.0.2",
}


# Seconds the processes of a topology get to exit on SIGTERM before SIGKILL.
DESTROY_GRACE = 3.0
# Run a command as nobody with every capability dropped, for good.
UNPRIVILEGED = (
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "--inh-caps=-all",
    "--bounding-set=-all",
    "--no-new-privs",
)


def _run(*argv, check=True):
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=30)


def twistdCommand():
    """
    The twistd beside this Python, so namespaces run the same environment.
    """
    candidate = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(candidate):
        return [candidate]
    found = shutil.which("twistd")
    if found is None:
        raise RuntimeError("twistd not found beside the Python running ENT")
    return [found]


def residentMemory(pid):
    """
    Resident memory of process C{pid}, in bytes.
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class Topology:
    """
    Four namespaces joined by veth links, and the processes started in them.

    Use as a context manager: leaving it kills the processes and deletes the
    namespaces, whatever happened inside.
    """

    def __init__(self, prefix=None, logdir=None, hosts=HOSTS, links=LINKS):
        """
        C{links}: C{(host a, address a, host b, address b)}, each a veth
        pair with a /24 on either end.
        """
        self.prefix = prefix or f"ent{os.getpid()}"
        self.logdir = logdir
        self.hosts = tuple(hosts)
        self.links = tuple(links)
        self.processes = []
        self.created = []

    def ns(self, host):
        return f"{self.prefix}-{host}"

    def __enter__(self):
        try:
            self.build()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc):
        self.destroy()

    def build(self):
        for host in self.hosts:
            name = self.ns(host)
            _run("ip", "netns", "add", name)
            self.created.append(name)
            _run("ip", "-n", name, "link", "set", "lo", "up")
        for index, (a, addressA, b, addressB) in enumerate(self.links):
            devA, devB = f"v{index}{a}", f"v{index}{b}"
            _run("ip", "-n", self.ns(a), "link", "add", devA, "type", "veth", "peer", "name", devB, "netns", self.ns(b))
            for host, dev, address in ((a, devA, addressA), (b, devB, addressB)):
                _run("ip", "-n", self.ns(host), "addr", "add", f"{address}/24", "dev", dev)
                _run("ip", "-n", self.ns(host), "link", "set", dev, "up")

    def exec(self, host, *argv, **kwargs):
        """
        Run a command in C{host}'s namespace and wait for it.
        """
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", 120)
        return subprocess.run(["ip", "netns", "exec", self.ns(host), *argv], **kwargs)

    def start(self, host, *argv, name=None):
        """
        Start a long-running command in C{host}'s namespace; its output goes
        to a log file in C{logdir}.
        """
        name = name or f"{host}-{argv[0].rsplit('/', 1)[-1]}"
        log = open(os.path.join(self.logdir, f"{name}.log"), "ab") if self.logdir else subprocess.DEVNULL
        process = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(host), *argv], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        if log is not subprocess.DEVNULL:
            log.close()
        process.entName = name
        self.processes.append(process)
        return process

    def twistd(self, host, plugin, *args, name=None, unprivileged=False):
        """
        Start C{twistd plugin args} in C{host}; C{unprivileged}: as nobody,
        with no capabilities at all (not even inheritable or in the
        bounding set), as a rootless agent runs.
        """
        prefix = UNPRIVILEGED if unprivileged else ()
        return self.start(
            host, *prefix, *twistdCommand(), "-n", "--pidfile=", plugin, *args, name=name or f"{host}-{plugin}"
        )

    def stop(self, process, sig=signal.SIGTERM, timeout=10.0):
        """
        Signal C{process} and wait; return its exit code and the seconds it took.
        """
        started = time.monotonic()
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode, time.monotonic() - started

    def destroy(self):
        # SIGTERM first, so that what cleans up after itself outside the
        # namespaces (a rootless agent's socket directory) can; SIGKILL what
        # is still there after a grace period.
        alive = [p for p in reversed(self.processes) if p.poll() is None]
        for process in alive:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + DESTROY_GRACE
        for process in alive:
            try:
                process.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                pass
        for process in alive:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait()
        self.processes = []
        for name in reversed(self.created):
            # Processes started by a command we ran may still hold the
            # namespace; kill whatever is left in it before deleting it.
            pids = _run("ip", "netns", "pids", name, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _run("ip", "netns", "del", name, check=False)
        self.created = []

    def waitFor(self, check, timeout=15.0, interval=0.1):
        """
        Poll C{check} until it returns a true value; return it, or raise.
        """
        deadline = time.monotonic() + timeout
        while True:
            result = check()
            if result:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {check}")
            time.sleep(interval)


class Tunnel:
    """
    Topology plus ENT's four services and an echo server on the server host.
    """

    def __init__(
        self, agentArgs=(), gatewayArgs=(), logdir=None, hostArgs=None, waitUp=True, roleArgs=None, unprivileged=()
    ):
        self.ownLogdir = logdir is None
        self.logdir = logdir or tempfile.mkdtemp(prefix="ent-")
        self.topology = Topology(logdir=self.logdir)
        self.agentArgs = list(agentArgs)
        self.gatewayArgs = list(gatewayArgs)
        # Extra arguments of one host's service, e.g. its own certificate.
        self.hostArgs = dict(hostArgs or {})
        # What each agent carries, instead of ENG's --dport 7 / --replay 7.
        self.roleArgs = {"client": ["--dport", "7"], "server": ["--replay", "7"], **(roleArgs or {})}
        self.waitUp = waitUp
        # Hosts whose agent runs as nobody with no capabilities (--stack user).
        self.unprivileged = frozenset(unprivileged)
        self.services = {}

    def __enter__(self):
        self.topology.__enter__()
        try:
            self.startAll()
        except BaseException:
            self.topology.destroy()
            raise
        return self

    def __exit__(self, *exc):
        self.topology.destroy()
        if self.ownLogdir:
            shutil.rmtree(self.logdir, ignore_errors=True)

    def rss(self, host):
        """
        Resident memory of C{host}'s ENT process, in bytes.
        """
        return residentMemory(self.services[host].pid)

    def startAll(self):
        t = self.topology
        self.echo = t.start(
            "server", sys.executable, ECHOSVR, "server", "--host", "0.0.0.0", "--port", "7", name="echo"
        )
        self.startService("gw2")
        self.startService("gw1")
        self.startService("server")
        self.startService("client")
        if self.waitUp:
            try:
                t.waitFor(self.tunnelUp, timeout=30)
            except TimeoutError:
                raise TimeoutError(f"the tunnel did not come up; logs:\n{self.logs()}")

    def startService(self, host):
        t = self.topology
        if host == "gw2":
            args = ["entg", "--entg-listen", "6979", "--enta-listen", "6980", *self.gatewayArgs]
        elif host == "gw1":
            args = ["entg", "--entg-connect", f"{ADDRESS['gw2']}:6979", "--enta-listen", "6980", *self.gatewayArgs]
        elif host == "server":
            args = ["enta", *self.roleArgs["server"], "--entg-connect", f"{ADDRESS['gw2.agent']}:6980", *self.agentArgs]
        else:
            args = ["enta", *self.roleArgs["client"], "--entg-connect", f"{ADDRESS['gw1.agent']}:6980", *self.agentArgs]
        process = t.twistd(host, *args, *self.hostArgs.get(host, ()), unprivileged=host in self.unprivileged)
        self.services[host] = process
        return process

    def tunnelUp(self):
        if self.unprivileged:
            # No TUN to ping through: a short echo through the local port.
            return self.topology.exec("client", *self.echoCommand(64, timeout=2), timeout=10).returncode == 0
        return self.topology.exec("client", "ping", "-c", "1", "-W", "1", "192.168.0.254").returncode == 0

    def echoTarget(self):
        """
        Where the client host's app connects: the server's address (the
        TUN agent captures it), or a rootless agent's --listen port.
        """
        if "client" in self.unprivileged:
            return "127.0.0.1", USER_LISTEN_PORT
        return ADDRESS["server"], 7

    def echoCommand(self, size, timeout=60, connections=1):
        host, port = self.echoTarget()
        return [
            sys.executable,
            ECHOSVR,
            "client",
            "--host",
            host,
            "--port",
            str(port),
            "--bytes",
            str(size),
            "--timeout",
            str(timeout),
            "--connections",
            str(connections),
        ]

    def echoClient(self, size, timeout=60, connections=1):
        return self.topology.exec("client", *self.echoCommand(size, timeout, connections), timeout=timeout + 30)

    def stopServices(self):
        """
        SIGTERM every ENT service; return {host: (exit code, seconds)}.
        """
        return {host: self.topology.stop(p) for host, p in self.services.items()}

    def leftovers(self):
        """
        What of ENT's is left in any namespace: TUN devices, nftables
        tables, policy rules beyond the defaults, ENT's routes in any table.
        """
        found = {}
        for host in HOSTS:
            ex = self.topology.exec
            what = []
            tuns = ex(host, "ip", "-o", "link", "show", "type", "tun").stdout.strip()
            if tuns:
                what.append(f"tun: {tuns}")
            tables = ex(host, "nft", "list", "tables").stdout.strip()
            if tables:
                what.append(f"nft: {tables}")
            rules = ex(host, "ip", "rule").stdout.strip().splitlines()
            extra = [r for r in rules if not any(d in r for d in ("lookup local", "lookup main", "lookup default"))]
            if extra:
                what.append(f"rules: {extra}")
            routes = ex(host, "ip", "route", "show", "table", "all", "proto", "231").stdout.strip()
            if routes:
                what.append(f"routes: {routes}")
            if what:
                found[host] = what
        return found

    def logs(self, lines=40):
        out = []
        for path in sorted(glob.glob(os.path.join(self.logdir, "*.log"))):
            with open(path, errors="replace") as f:
                tail = f.readlines()[-lines:]
            out.append(f"--- {os.path.basename(path)}\n" + "".join(tail))
        return "\n".join(out)
