"""
The bench's namespaces: the four-host topology of L{ent.testing.topology}
with the bench's services and the ping-pong server, a record of every
namespace made (deleted afterwards, also on Ctrl-C or SIGTERM), and the
logs of a failed run.
"""

import contextlib
import os
import signal
import subprocess
import sys

from ent.testing.topology import ADDRESS, Topology, Tunnel

HERE = os.path.dirname(os.path.abspath(__file__))


PORT = 5201  # iperf3's port, the one ENT captures and replays


PINGPONG = os.path.join(HERE, "pingpong.py")


LATENCY_PORT = 5202  # the ping-pong server's (bench/pingpong.py), mapped and exposed by ENT too


TUN_CLIENT, TUN_SERVER = "192.168.0.1", "192.168.0.254"


def say(text=""):
    print(text, flush=True)


class MeasureError(Exception):
    pass


def check(t, host, *argv):
    result = t.exec(host, *argv)
    if result.returncode != 0:
        raise MeasureError(f"{host}: {' '.join(argv)}: exit {result.returncode}: {result.stderr.strip()}")
    return result.stdout


class Namespaces:
    """
    Remembers the namespaces a run created (name and nsfs inode), to prove
    at the end that none of them, and no process inside one, is left.
    """

    def __init__(self, prefix):
        self.prefix = prefix
        self.inodes = set()
        self.count = 0

    def record(self, topology):
        for name in topology.created:
            self.count += 1
            with contextlib.suppress(OSError):
                self.inodes.add(os.stat(f"/run/netns/{name}").st_ino)

    def leftovers(self):
        left = []
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n")
        left += [f"namespace {line.split()[0]}" for line in listed if line.startswith(self.prefix + "-")]
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                link = os.readlink(f"/proc/{entry}/ns/net")
            except OSError:
                continue
            inode = int(link.split("[", 1)[1].rstrip("]"))
            if inode in self.inodes:
                left.append(f"process {entry} ({readComm(int(entry))}) in a benchmark namespace")
        return left


@contextlib.contextmanager
def cleanupShielded():
    """
    While cleaning up, a second Ctrl-C or SIGTERM must not cut the clean-up
    short and leave namespaces behind.
    """
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def startPingPong(t):
    """
    The ping-pong server on the server host, on LATENCY_PORT.
    """
    t.start("server", sys.executable, PINGPONG, "server", str(LATENCY_PORT), name="pingpong-server")


def waitListening(t, host, port, timeout=15):
    t.waitFor(lambda: t.exec(host, "ss", "-Hltn", f"sport = :{port}").stdout.strip(), timeout=timeout)


class BenchTunnel(Tunnel):
    """
    ENT's four services, capturing and replaying the iperf3 port instead of
    the echo port, with an iperf3 server on the server host.
    """

    def __init__(self, port, prefix, **kwargs):
        super().__init__(**kwargs)
        self.port = port
        self.topology = Topology(prefix=prefix, logdir=self.logdir)

    def startAll(self):
        t = self.topology
        self.echo = None
        t.start("server", "iperf3", "-s", "-p", str(self.port), name="iperf3-server")
        startPingPong(t)
        for host in ("gw2", "gw1", "server", "client"):
            self.startService(host)
        try:
            t.waitFor(self.tunnelUp, timeout=30)
            waitListening(t, "server", self.port)
        except TimeoutError:
            raise MeasureError(f"the ENT tunnel did not come up; logs:\n{self.logs()}")

    def startService(self, host):
        if host in ("gw1", "gw2"):
            return super().startService(host)
        if host == "server":
            args = [
                "enta",
                "--replay",
                str(self.port),
                "--expose",
                str(LATENCY_PORT),
                "--entg-connect",
                f"{ADDRESS['gw2.agent']}:6980",
            ]
        else:
            args = [
                "enta",
                "--dport",
                str(self.port),
                "--map",
                f"{ADDRESS['server']}:{LATENCY_PORT}={TUN_SERVER}:{LATENCY_PORT}",
                "--entg-connect",
                f"{ADDRESS['gw1.agent']}:6980",
            ]
        process = self.topology.twistd(host, *args, *self.agentArgs)
        self.services[host] = process
        return process


def tails(logdir, lines=20):
    out = []
    for name in sorted(os.listdir(logdir)):
        with open(os.path.join(logdir, name), errors="replace") as f:
            out.append(f"--- {name}\n" + "".join(f.readlines()[-lines:]))
    return "\n".join(out)


def readComm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"
