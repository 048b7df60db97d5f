"""
Checks that several end-to-end tests make of a running tunnel.
"""

import json
import re
import shutil
import signal
import sys
import tempfile

from ent.observability.status import Scrape
from ent.testing.topology import twistdCommand


def tempDir(testCase, prefix):
    """
    A new directory in the system's temporary directory (readable by the
    processes a test starts in namespaces), removed after C{testCase}.
    """
    path = tempfile.mkdtemp(prefix=prefix)
    testCase.addCleanup(shutil.rmtree, path, True)
    return path


def sha256s(output):
    """
    The sha256 the echo client sent and the one it got back.
    """
    return (re.search(r"sha256 sent (\w+)", output).group(1), re.search(r"sha256 back (\w+)", output).group(1))


def assertEchoAndTransfer(testCase, tunnel, size=20_000_000):
    """
    A short echo, then C{size} bytes through the tunnel and back with the
    same sha256.
    """
    echo = tunnel.echoClient(1000)
    testCase.assertEqual(echo.returncode, 0, echo.stdout + echo.stderr + tunnel.logs())
    big = tunnel.echoClient(size, timeout=120)
    testCase.assertEqual(big.returncode, 0, big.stdout + big.stderr + tunnel.logs())
    sent, back = sha256s(big.stdout)
    testCase.assertEqual(sent, back)
    testCase.assertIn(f"received {size} bytes", big.stdout)


def assertStopsCleanly(testCase, tunnel):
    """
    SIGTERM every service: each exits within 2 s and nothing of ENT's is
    left in any namespace.
    """
    for host, (code, seconds) in tunnel.stopServices().items():
        testCase.assertIn(code, (0, -signal.SIGTERM), f"{host}: exit {code}\n{tunnel.logs()}")
        testCase.assertLess(seconds, 2.0, f"{host} took {seconds:.2f}s to stop\n{tunnel.logs()}")
    testCase.assertEqual(tunnel.leftovers(), {})


METRICS_PORT = 9100
METRICS = ["--metrics", f"tcp:{METRICS_PORT}:interface=127.0.0.1"]

_FETCH = "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"


def scrapeIn(topology, host, port=METRICS_PORT):
    """
    Scrape the metrics endpoint that C{host}'s service serves on its own
    loopback, from inside its namespace.
    """
    result = topology.exec(host, sys.executable, "-c", _FETCH, f"http://127.0.0.1:{port}/metrics", timeout=30)
    if result.returncode != 0:
        raise AssertionError(f"cannot scrape {host}: {result.stderr}")
    return Scrape(result.stdout)


def statusIn(topology, host, port=METRICS_PORT):
    """
    Run C{python -m ent status} in C{host}'s namespace: (exit code, output).
    """
    result = topology.exec(host, sys.executable, "-m", "ent", "status", "--metrics", f"127.0.0.1:{port}", timeout=30)
    return result.returncode, result.stdout + result.stderr


def twistdWithEnv(topology, host, env, plugin, *args, name=None):
    """
    Start C{twistd plugin args} in C{host} as L{Topology.twistd} does, with
    C{env} (a dict) added to that one process's environment, e.g. the
    ENT_SIM_* values the ent_sim attester reads.
    """
    return topology.start(
        host,
        "env",
        *(f"{key}={value}" for key, value in env.items()),
        *twistdCommand(),
        "-n",
        "--pidfile=",
        plugin,
        *args,
        name=name or f"{host}-{plugin}",
    )


def established(topology, host, port):
    """
    The established TCP connections in C{host} whose local port is
    C{port}, as a set of C{(local, peer)} "ADDR:PORT" pairs.
    """
    result = topology.exec(host, "ss", "-tnH", "state", "established", f"( sport = :{port} )", timeout=30)
    if result.returncode != 0:
        raise AssertionError(f"ss failed in {host}: {result.stderr}")
    pairs = set()
    for line in result.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 4:
            pairs.add((fields[2], fields[3]))
    return pairs


def legsIn(topology, host, port=METRICS_PORT):
    """
    A gateway's C{/legs} (one dict per leg), fetched from inside C{host}'s
    namespace.
    """
    result = topology.exec(host, sys.executable, "-c", _FETCH, f"http://127.0.0.1:{port}/legs", timeout=30)
    if result.returncode != 0:
        raise AssertionError(f"cannot fetch /legs of {host}: {result.stderr}")
    return json.loads(result.stdout)
