"""
A start that fails, in the foreground and as a daemon: twistd exits
non-zero within seconds with ENT's one-line reason, leaves no pidfile and
configures nothing.

Real twistd processes in a namespace of the test's own.
"""

import os
import subprocess
import sys
import time
import uuid

from twisted.trial import unittest

from ent.testing.topology import twistdCommand
from tests.checks import tempDir
from tests.netns import requireRoot

# Seconds a failed start may take to return.
LIMIT = 10


class FailedStartTests(unittest.TestCase):
    def setUp(self):
        requireRoot(self)
        self.ns = f"entfail-{uuid.uuid4().hex[:8]}"
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        self.addCleanup(self._deleteNamespace)
        self.exec("ip", "link", "set", "lo", "up", check=True)
        self.dir = tempDir(self, "ent-fail-")
        self.pidfile = os.path.join(self.dir, "ent.pid")
        self.holders = []

    def _deleteNamespace(self):
        for process in self.holders:
            process.kill()
            process.wait()
        for pid in subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True).stdout.split():
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", self.ns], check=False)
        subprocess.run(["rm", "-rf", self.dir], check=False)

    def exec(self, *argv, check=False, timeout=30):
        return subprocess.run(
            ["ip", "netns", "exec", self.ns, *argv], capture_output=True, text=True, check=check, timeout=timeout
        )

    def twistd(self, daemon, plugin, *args):
        """
        Run twistd; return its result and the seconds it took.
        """
        mode = [] if daemon else ["-n"]
        logfile = os.path.join(self.dir, "twistd.log")
        started = time.monotonic()
        result = self.exec(
            *twistdCommand(),
            *mode,
            f"--pidfile={self.pidfile}",
            f"--logfile={logfile}",
            plugin,
            *args,
            timeout=LIMIT * 3,
        )
        return result, time.monotonic() - started

    def configured(self):
        """
        What of ENT's is configured in the namespace.
        """
        return {
            "nft": self.exec("nft", "list", "tables").stdout.strip(),
            "rules": [
                r
                for r in self.exec("ip", "rule").stdout.splitlines()
                if not any(t in r for t in ("lookup local", "lookup main", "lookup default"))
            ],
            "tuns": [
                line
                for line in self.exec("ip", "-o", "link", "show", "type", "tun").stdout.splitlines()
                if "foreign" not in line
            ],
        }

    def assertFailsCleanly(self, result, seconds, reason):
        output = result.stdout + result.stderr
        self.assertNotEqual(result.returncode, 0, output)
        self.assertLess(seconds, LIMIT, output)
        self.assertIn(reason, result.stderr)
        self.assertNotIn("Traceback", output)
        self.assertFalse(os.path.exists(self.pidfile), f"pidfile left behind\n{output}")
        self.assertEqual(self.configured(), {"nft": "", "rules": [], "tuns": []})

    def tunNameTaken(self):
        self.exec("ip", "tuntap", "add", "foreign", "mode", "tun", check=True)
        return ("enta", "--dport", "7", "--tun-name", "foreign")

    def test_tunNameTakenInTheForeground(self):
        result, seconds = self.twistd(False, *self.tunNameTaken())
        self.assertFailsCleanly(result, seconds, "enta: cannot start: an interface named foreign")

    def test_tunNameTakenAsDaemon(self):
        result, seconds = self.twistd(True, *self.tunNameTaken())
        self.assertFailsCleanly(result, seconds, "enta: cannot start: an interface named foreign")

    def portTaken(self):
        holder = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.ns,
                sys.executable,
                "-c",
                "import socket, time; s = socket.socket(); s.bind(('0.0.0.0', 6980)); s.listen();"
                "print('ready', flush=True); time.sleep(120)",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.holders.append(holder)
        self.assertEqual(holder.stdout.readline().strip(), "ready")
        return ("entg",)

    def test_portInUseInTheForeground(self):
        result, seconds = self.twistd(False, *self.portTaken())
        self.assertFailsCleanly(result, seconds, "entg: cannot start:")
        self.assertIn("6980", result.stderr)

    def test_portInUseAsDaemon(self):
        result, seconds = self.twistd(True, *self.portTaken())
        self.assertFailsCleanly(result, seconds, "entg: cannot start:")
        self.assertIn("6980", result.stderr)

    def test_missingLibraryAsDaemon(self):
        missing = os.path.join(self.dir, "no-such-librats_tls.so")
        result, seconds = self.twistd(True, "entg", "--enta-rats-tls", "--rats-tls-lib", missing)
        self.assertFailsCleanly(result, seconds, "no-such-librats_tls.so")

    def test_agentPortInUseUndoesHostConfiguration(self):
        """
        The agent's metrics port is taken: the start fails after the TUN,
        rules and route were made, and every one of them is undone.
        """
        self.portTaken()
        result, seconds = self.twistd(True, "enta", "--dport", "7", "--metrics", "6980")
        self.assertFailsCleanly(result, seconds, "enta: cannot start:")
