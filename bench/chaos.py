"""
The chaos run: the four-host tunnel under random faults, proving that a
fault costs the app at most an error it sees, never wrong data, a leak in
the clear, a process that no longer serves or something left behind.

    make chaos
    CHAOS_SECONDS=600 CHAOS_KINDS=plain,tls,rats-tls CHAOS_SEED=1 .venv/bin/python -m bench.chaos

One phase per leg kind (plain, TLS, rats-tls on the real library), each in
fresh namespaces (ent/testing/topology.py, deleted also on failure):

  - traffic, in the client host: 20 TCP echo streams of 10 KB-20 MB
    (log-uniform) through --map 10.3.0.2:7, each byte compared with what
    was sent as it comes back, and the sha256 of both at the end; a new
    stream as each ends. UDP round trips through --map 10.3.0.2:5353/udp,
    each echo waited for up to 1 s and compared byte for byte;
  - faults, one at a time, CHAOS_SECONDS long, 3-15 s apart (3-6 s in a
    phase under 150 s, so each process is hit): kill -9 and restart,
    SIGSTOP for 2-8 s, SIGTERM and restart (of the client agent, gw1, gw2
    or the server agent), or a veth link down for 1-5 s. Targets come from
    a shuffled round of the four processes and one link, kinds from a
    shuffled round of the three, so every process and kind is hit early;
  - the rules: no wrong data; failures are errors the app sees (tallied);
    nothing to the app's destination leaves the client host outside the
    TUN although a route to it exists there (an nftables counter), except
    after a SIGTERM of the client agent, which by design removes its
    capture (README "Fail closed"), counted apart; at the end a fresh echo
    and a UDP round trip succeed, every process is alive, RSS and open
    descriptors are within 20 % of their warm-up values, SIGTERM stops
    every process within 2 s and nothing of ENT's is left.

RSS and descriptors: each process is measured 10 s after its start, under
the traffic, and again at the end, still under the traffic and at least
10 s after the last fault; a process a fault restarted is measured against
its own post-restart warm-up (its old figures died with it).

Writes bench/chaos.md (and prints it); exits 1 if any rule was broken.
CHAOS_SEED seeds every random choice (printed; random if unset).
"""

import argparse
import collections
import errno
import hashlib
import json
import math
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ent.testing.topology import ADDRESS, LINKS, Tunnel, residentMemory  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SELF = os.path.abspath(__file__)
REPORT = os.path.join(HERE, "chaos.md")
RATS_TLS_LIB = os.path.join(os.path.dirname(HERE), ".build", "rats-tls", "head", "lib", "rats-tls", "librats_tls.so")

SERVER = ADDRESS["server"]
TCP_PORT, UDP_PORT = 7, 5353
CONTROL_PORT = 9  # not captured: proves that the leak watch sees the direct route
PROCESSES = ("client", "gw1", "gw2", "server")
FAULTS = ("kill -9", "SIGSTOP", "SIGTERM", "link down")
KINDS = ("plain", "tls", "rats-tls")
STREAMS = 20
SIZES = (10_000, 20_000_000)
WARMUP = 10.0  # seconds after a (re)start before a process's RSS and fds count
SETTLE = 60.0  # seconds the tunnel has to serve a fresh echo after the last fault
BOUND = 0.20  # RSS and fds within this fraction of their warm-up values
STOP_LIMIT = 2.0  # seconds an ENT process may take to exit on SIGTERM
IDLE = 60.0  # seconds a stream may make no progress before the app gives up
CONNECT = 10.0

LEAK_WATCH = f"""
table ip chaoswatch {{
  counter leaked {{ }}
  counter control {{ }}
  chain post {{
    type filter hook postrouting priority 0; policy accept;
    oifname != "tun0" ip daddr {SERVER} tcp dport {TCP_PORT} counter name leaked
    oifname != "tun0" ip daddr {SERVER} udp dport {UDP_PORT} counter name leaked
    oifname != "tun0" ip daddr {SERVER} udp dport {CONTROL_PORT} counter name control
  }}
}}
"""


def say(text=""):
    print(text, flush=True)


# --- in the client host: the app's traffic ---------------------------------


class Pattern:
    """
    A stream's bytes, regenerated from its seed at any offset, so the
    receiver checks every byte as it arrives without keeping what was sent.
    """

    BLOCK = 65536

    def __init__(self, seed):
        self.seed = seed
        self.base = random.Random(seed).randbytes(2 * self.BLOCK)

    def block(self, index):
        offset = (index * 2654435761 + self.seed) % self.BLOCK
        return memoryview(self.base)[offset : offset + self.BLOCK]

    def slice(self, position, length):
        parts = []
        while length:
            index, within = divmod(position, self.BLOCK)
            n = min(length, self.BLOCK - within)
            parts.append(self.block(index)[within : within + n])
            position += n
            length -= n
        return b"".join(parts)


def errorName(exc):
    """
    What the app saw, as one short tally key.
    """
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


class Traffic:
    """
    The streams and the UDP round trips; one JSON line per outcome on stdout.
    """

    def __init__(self, host, seed, streams):
        self.host = host
        self.rng = random.Random(seed)
        self.streams = streams
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.sockets = set()

    def emit(self, **event):
        with self.lock:
            sys.stdout.write(json.dumps(event) + "\n")
            sys.stdout.flush()

    def run(self):
        for _ in range(self.streams):
            threading.Thread(
                target=self.streamLoop, args=(random.Random(self.rng.getrandbits(64)),), daemon=True
            ).start()
        threading.Thread(target=self.udpLoop, args=(random.Random(self.rng.getrandbits(64)),), daemon=True).start()
        self.emit(e="started")
        self.stopping.wait()
        with self.lock:
            for s in list(self.sockets):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        time.sleep(0.5)
        self.emit(e="end")

    def streamLoop(self, rng):
        while not self.stopping.is_set():
            size = int(math.exp(rng.uniform(math.log(SIZES[0]), math.log(SIZES[1]))))
            ok = self.stream(size, rng.getrandbits(63))
            if not ok:
                time.sleep(1.0)  # as an app backs off, not a refused-connect spin

    def stream(self, size, seed):
        pattern = Pattern(seed)
        started = time.monotonic()
        state = {"sent": 0, "error": None}
        try:
            s = socket.create_connection((self.host, TCP_PORT), timeout=CONNECT)
        except OSError as e:
            if not self.stopping.is_set():
                self.emit(e="tcp", ok=False, error=errorName(e), size=size, got=0, phase="connect")
            return False
        with self.lock:
            self.sockets.add(s)
        s.settimeout(IDLE)
        sentHash = hashlib.sha256()

        def send():
            try:
                position = 0
                while position < size and not self.stopping.is_set():
                    chunk = pattern.slice(position, min(Pattern.BLOCK, size - position))
                    s.sendall(chunk)
                    sentHash.update(chunk)
                    position += len(chunk)
                    state["sent"] = position
                s.shutdown(socket.SHUT_WR)
            except OSError as e:
                state["error"] = state["error"] or errorName(e)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        backHash = hashlib.sha256()
        got = 0
        try:
            while True:
                data = s.recv(262144)
                if not data:
                    break
                expected = pattern.slice(got, len(data)) if got + len(data) <= size else None
                if expected != data:
                    self.emit(e="wrong", what="tcp", size=size, at=got, length=len(data), seed=seed)
                    return False
                backHash.update(data)
                got += len(data)
        except OSError as e:
            state["error"] = state["error"] or errorName(e)
        finally:
            sender.join(5)
            with self.lock:
                self.sockets.discard(s)
            s.close()
        if self.stopping.is_set():
            return True
        if state["error"] is None and got == size and state["sent"] == size:
            if sentHash.hexdigest() != backHash.hexdigest():
                self.emit(e="wrong", what="tcp", size=size, at=-1, length=0, seed=seed)
                return False
            self.emit(e="tcp", ok=True, size=size, seconds=round(time.monotonic() - started, 3))
            return True
        self.emit(e="tcp", ok=False, error=state["error"] or "EOF early", size=size, got=got)
        return False

    def udpLoop(self, rng):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect((self.host, UDP_PORT))
        sent = {}
        seq = 0
        while not self.stopping.is_set():
            seq += 1
            payload = struct.pack("!Q", seq) + rng.randbytes(rng.randint(16, 1200))
            sent[seq] = payload
            error = None
            deadline = time.monotonic() + 1.0
            try:
                s.send(payload)
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        error = "lost"
                        break
                    s.settimeout(left)
                    reply = s.recv(2048)
                    number = struct.unpack("!Q", reply[:8])[0] if len(reply) >= 8 else None
                    if sent.get(number) != reply:
                        self.emit(e="wrong", what="udp", seq=seq, replySeq=number, length=len(reply))
                        break
                    if number == seq:
                        break
            except TimeoutError:
                error = "lost"
            except OSError as e:
                error = errorName(e)
            if self.stopping.is_set():
                break
            self.emit(e="udp", ok=error is None, **({"error": error} if error else {}))
            time.sleep(0.05 if error is None else 0.5)


def trafficMain(args):
    traffic = Traffic(args.host, args.seed, args.streams)
    signal.signal(signal.SIGTERM, lambda *_: traffic.stopping.set())
    traffic.run()
    os._exit(0)


def udpEchoMain(args):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", args.port))
    while True:
        data, peer = s.recvfrom(65535)
        s.sendto(data, peer)


# --- the orchestrator -------------------------------------------------------


def tlsArgs(directory):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "ent",
            "certs",
            directory,
            f"gw1={ADDRESS['gw1.agent']},{ADDRESS['gw1']}",
            f"gw2={ADDRESS['gw2']},{ADDRESS['gw2.agent']}",
            "client",
            "server",
        ],
        check=True,
        capture_output=True,
    )

    def tls(name, *flags):
        pem = os.path.join(directory, name)
        return [*flags, "--tls-cert", f"{pem}.pem", "--tls-key", f"{pem}.key", "--tls-ca", f"{directory}/ca.pem"]

    return {
        "client": tls("client", "--entg-tls"),
        "gw1": tls("gw1", "--enta-tls", "--entg-tls"),
        "gw2": tls("gw2", "--enta-tls", "--entg-tls"),
        "server": tls("server", "--entg-tls"),
    }


def ratsArgs(library=RATS_TLS_LIB):
    if not os.path.isfile(library):
        raise SystemExit(f"chaos: no {library}: scripts/setup.sh builds it (scripts/ratstls-build.sh)")
    common = ["--rats-tls-lib", library, "--attester", "nullattester", "--verifier", "nullverifier"]
    common += ["--rats-tls-log-level", "off"]
    return {
        "client": ["--entg-rats-tls", *common],
        "gw1": ["--enta-rats-tls", "--entg-rats-tls", *common],
        "gw2": ["--enta-rats-tls", "--entg-rats-tls", *common],
        "server": ["--entg-rats-tls", *common],
    }


ROLES = {
    "client": ["--map", f"{SERVER}:{TCP_PORT}=192.168.0.254:{TCP_PORT}"]
    + ["--map", f"{SERVER}:{UDP_PORT}/udp=192.168.0.254:{UDP_PORT}"],
    "server": ["--expose", str(TCP_PORT), "--expose", f"{UDP_PORT}/udp"],
}

UDP_PROBE = (
    "import os, socket, sys\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1)\n"
    "s.connect((sys.argv[1], int(sys.argv[2]))); data = os.urandom(512)\n"
    "for _ in range(5):\n"
    "    try:\n"
    "        s.send(data)\n"
    "        if s.recv(2048) == data: print('answered'); break\n"
    "    except OSError as e: print(e)\n"
)


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


class Phase:
    """
    One leg kind: the tunnel, the traffic, the faults and the end checks.
    """

    def __init__(self, kind, seconds, rng, logdir):
        self.kind = kind
        self.seconds = seconds
        self.rng = rng
        self.logdir = logdir
        self.faults = collections.Counter()  # (kind, target)
        self.tcp = collections.Counter()
        self.tcpErrors = collections.Counter()
        self.tcpBytes = 0
        self.udp = collections.Counter()
        self.udpErrors = collections.Counter()
        self.wrong = []
        self.checks = []  # (name, ok, detail)
        self.broken = []
        self.baseline = {}  # host: (pid, rss, fds)
        self.due = {}  # host: when its warm-up ends
        self.stops = []  # seconds SIGTERM took, by host
        self.unexpected = []
        self.leakedByDesign = 0
        self.memory = {}
        self.counting = True
        self.log = []
        self.targetRound = []
        self.kindRound = []
        gapMax = 15.0 if seconds >= 150 else 6.0
        self.gap = (3.0, gapMax)

    def hostArgs(self):
        if self.kind == "tls":
            return tlsArgs(tempfile.mkdtemp(prefix="chaos-tls-", dir=self.logdir))
        if self.kind == "rats-tls":
            return ratsArgs()
        return {}

    # The events of the traffic process.

    def read(self, stream):
        for line in stream:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            kind = event.get("e")
            if kind == "started":
                self.trafficStarted.set()
            elif kind == "wrong":
                self.wrong.append(event)
                say(f"chaos: WRONG DATA {event}")
            elif not self.counting:
                continue
            elif kind == "tcp":
                if event["ok"]:
                    self.tcp["completed"] += 1
                    self.tcpBytes += event["size"]
                else:
                    self.tcp["failed"] += 1
                    self.tcpErrors[event["error"]] += 1
            elif kind == "udp":
                if event["ok"]:
                    self.udp["ok"] += 1
                else:
                    self.udp["lost"] += 1
                    self.udpErrors[event["error"]] += 1

    def run(self):
        say(f"chaos: phase {self.kind}, {self.seconds:g} s of faults")
        self.trafficStarted = threading.Event()
        with Tunnel(roleArgs=ROLES, hostArgs=self.hostArgs(), logdir=self.logdir) as tunnel:
            self.tunnel, self.t = tunnel, tunnel.topology
            try:
                self.runIn()
            finally:
                for host in PROCESSES:
                    process = tunnel.services.get(host)
                    if process is not None and process.poll() is None:
                        os.kill(process.pid, signal.SIGCONT)
                self.leftLogs = tunnel.logs(60)
        return self

    def runIn(self):
        t = self.t
        t.start("server", sys.executable, SELF, "udp-echo", "--port", str(UDP_PORT), name="udpecho")
        t.exec("client", "nft", "-f", "-", input=LEAK_WATCH, check=True)
        self.routeToServer()
        t.waitFor(lambda: self.probeUdp() == "answered", timeout=30)
        t.waitFor(lambda: self.t.exec("client", *self.tunnel.echoCommand(1000, timeout=5)).returncode == 0, 30)
        # The direct route works and the watch counts what takes it.
        send = f"import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('{SERVER}', {CONTROL_PORT}))"
        control = t.exec("client", sys.executable, "-c", send)
        if control.returncode != 0 or self.counted("control") == 0:
            raise RuntimeError(f"the leak watch sees nothing on the direct route: {control.stderr}")

        now = time.monotonic()
        for host in PROCESSES:
            self.due[host] = now + WARMUP
        seed = self.rng.getrandbits(63)
        command = ["ip", "netns", "exec", t.ns("client"), sys.executable, SELF, "traffic", "--seed", str(seed)]
        self.traffic = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, start_new_session=True)
        t.processes.append(self.traffic)
        reader = threading.Thread(target=self.read, args=(self.traffic.stdout,), daemon=True)
        reader.start()
        if not self.trafficStarted.wait(30):
            raise RuntimeError("the traffic did not start")
        self.wait(WARMUP)

        end = time.monotonic() + self.seconds
        while True:
            gap = self.rng.uniform(*self.gap)
            if time.monotonic() + gap >= end:
                break
            self.wait(gap)
            self.fault()
        self.wait(max(end - time.monotonic(), 0))
        # Every process warmed up (restarted ones too), under the traffic.
        self.wait(max(max(self.due.values(), default=0) - time.monotonic(), 0) + 1)
        self.endChecks(reader)

    def wait(self, seconds):
        """
        Sleep, taking the warm-up figures that fall due and noticing any
        process that exits without a fault.
        """
        end = time.monotonic() + seconds
        while True:
            now = time.monotonic()
            for host, when in list(self.due.items()):
                if now >= when:
                    pid = self.tunnel.services[host].pid
                    self.baseline[host] = (pid, residentMemory(pid), fds(pid))
                    del self.due[host]
            for host in PROCESSES:
                process = self.tunnel.services[host]
                if process.poll() is not None:
                    self.unexpected.append((host, process.returncode))
                    self.broken.append(f"{host} exited by itself (code {process.returncode})")
                    say(f"chaos: {host} exited by itself (code {process.returncode}); restarting it")
                    self.restart(host)
            if now >= end:
                return
            time.sleep(min(0.2, end - now))

    def counted(self, counter):
        out = self.t.exec("client", "nft", "list", "counter", "ip", "chaoswatch", counter).stdout
        return int(out.split("packets ")[1].split()[0])

    def routeToServer(self):
        """
        A route from the client host to the server host by gw1, so that a
        packet that escapes the TUN would leave (and be counted).
        """
        self.t.exec("client", "ip", "route", "replace", "10.3.0.0/24", "via", ADDRESS["gw1.agent"], check=True)

    def probeUdp(self):
        result = self.t.exec("client", sys.executable, "-c", UDP_PROBE, SERVER, str(UDP_PORT), timeout=30)
        return result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr.strip()

    def restart(self, host):
        self.tunnel.startService(host)
        self.due[host] = time.monotonic() + WARMUP
        self.baseline.pop(host, None)

    def nextTarget(self):
        if not self.targetRound:
            self.targetRound = [*PROCESSES, self.rng.randrange(len(LINKS))]
            self.rng.shuffle(self.targetRound)
        return self.targetRound.pop()

    def nextKind(self):
        if not self.kindRound:
            self.kindRound = list(FAULTS[:3])
            self.rng.shuffle(self.kindRound)
        return self.kindRound.pop()

    def fault(self):
        target = self.nextTarget()
        if isinstance(target, int):
            a, _, b, _ = LINKS[target]
            host, dev = self.rng.choice(((a, f"v{target}{a}"), (b, f"v{target}{b}")))
            down = self.rng.uniform(1, 5)
            name = f"{LINKS[target][0]}-{LINKS[target][2]}"
            self.note(f"link down {name} ({dev}) for {down:.1f} s")
            self.t.exec(host, "ip", "link", "set", dev, "down", check=True)
            try:
                time.sleep(down)
            finally:
                self.t.exec(host, "ip", "link", "set", dev, "up", check=True)
                if target == 0:
                    self.routeToServer()  # the link's routes went with it
            self.faults[("link down", name)] += 1
            return
        kind = self.nextKind()
        process = self.tunnel.services[target]
        if kind == "SIGSTOP":
            pause = self.rng.uniform(2, 8)
            self.note(f"SIGSTOP {target} for {pause:.1f} s")
            os.kill(process.pid, signal.SIGSTOP)
            try:
                time.sleep(pause)
            finally:
                os.kill(process.pid, signal.SIGCONT)
        else:
            away = self.rng.uniform(0.5, 3)
            sig = signal.SIGKILL if kind == "kill -9" else signal.SIGTERM
            before = self.counted("leaked") if (target, sig) == ("client", signal.SIGTERM) else None
            code, seconds = self.t.stop(process, sig, timeout=10)
            self.note(f"{kind} {target} (exit {code} after {seconds:.2f} s), restart after {away:.1f} s")
            if sig == signal.SIGTERM:
                self.stops.append((target, code, seconds))
            time.sleep(away)
            self.restart(target)
            if before is not None:
                # A clean stop removes the capture, by design: what the app
                # sends meanwhile takes the host's routes. Counted apart.
                try:
                    self.t.waitFor(self.tunnel.tunnelUp, timeout=30)
                except TimeoutError:
                    pass
                self.leakedByDesign += self.counted("leaked") - before
        self.faults[(kind, target)] += 1

    def note(self, text):
        self.log.append(text)
        say(f"chaos: {self.kind}: {text}")

    def check(self, name, ok, detail=""):
        self.checks.append((name, ok, detail))
        if not ok:
            self.broken.append(f"{name}: {detail}")

    def endChecks(self, reader):
        t, tunnel = self.t, self.tunnel
        # A fresh echo and UDP round trip, within the settle time.
        deadline = time.monotonic() + SETTLE
        echo = None
        while time.monotonic() < deadline:
            echo = t.exec("client", *tunnel.echoCommand(100_000, timeout=10), timeout=40)
            if echo.returncode == 0 and "sha256 sent" in echo.stdout:
                break
            time.sleep(2)
        served = echo is not None and echo.returncode == 0
        if not served:
            # What each host's sockets to and from ENT look like, for the report.
            for host in PROCESSES:
                ss = t.exec(host, "ss", "-tnpi", "( sport = :6979 or dport = :6979 or sport = :6980 or dport = :6980 )")
                self.note(f"not serving; ss in {host}:\n{ss.stdout.strip()}")
        self.settled = SETTLE - max(deadline - time.monotonic(), 0)
        self.check("fresh echo after the last fault", served, "" if served else (echo.stdout + echo.stderr)[-400:])
        udp = self.probeUdp()
        self.check("fresh UDP round trip", udp == "answered", udp)
        alive = [h for h in PROCESSES if tunnel.services[h].poll() is None]
        self.check("every process alive", len(alive) == 4, f"alive: {alive}")

        # RSS and descriptors against the warm-up figures, under the traffic.
        bounded = True
        for host in PROCESSES:
            pid, rss0, fds0 = self.baseline[host]
            rss1, fds1 = residentMemory(pid), fds(pid)
            self.memory[host] = (rss0, rss1, fds0, fds1)
            if abs(rss1 - rss0) > BOUND * rss0 or abs(fds1 - fds0) > BOUND * fds0:
                bounded = False
        self.check("RSS and fds within 20 % of warm-up", bounded, repr(self.memory))

        self.counting = False
        self.traffic.send_signal(signal.SIGTERM)
        try:
            self.traffic.wait(20)
        except subprocess.TimeoutExpired:
            self.traffic.kill()
        reader.join(5)
        leaked = self.counted("leaked") - self.leakedByDesign
        self.check("nothing left the client host in the clear", leaked == 0, f"{leaked} packets")
        self.check("no wrong data", not self.wrong, repr(self.wrong[:5]))
        slow = [(h, c, round(s, 2)) for h, c, s in self.stops if c not in (0, -signal.SIGTERM) or s >= STOP_LIMIT]
        self.check("every SIGTERM of a fault exited within 2 s", not slow, repr(slow))
        t.exec("client", "nft", "delete", "table", "ip", "chaoswatch")
        t.exec("client", "ip", "route", "del", "10.3.0.0/24")

        stopped = tunnel.stopServices()
        slow = {h: (c, round(s, 2)) for h, (c, s) in stopped.items() if c not in (0, -signal.SIGTERM) or s >= 2.0}
        self.check("SIGTERM stops every process within 2 s", not slow, repr(slow))
        self.stopTimes = {h: s for h, (c, s) in stopped.items()}
        left = tunnel.leftovers()
        self.check("nothing of ENT's left (TUN, nft, rules, routes)", not left, repr(left))
        self.check("no process exited by itself", not self.unexpected, repr(self.unexpected))


# --- the report -------------------------------------------------------------


def mb(n):
    return f"{n / 2**20:.1f}"


def phaseTable(title, phases):
    faults = collections.Counter()
    tcp, tcpErrors, udp, udpErrors = (
        collections.Counter(),
        collections.Counter(),
        collections.Counter(),
        collections.Counter(),
    )
    tcpBytes, wrong, byDesign = 0, 0, 0
    for p in phases:
        faults.update(p.faults)
        tcp.update(p.tcp)
        tcpErrors.update(p.tcpErrors)
        udp.update(p.udp)
        udpErrors.update(p.udpErrors)
        tcpBytes += p.tcpBytes
        wrong += len(p.wrong)
        byDesign += p.leakedByDesign
    lines = [f"### {title}", ""]
    targets = [*PROCESSES, *(f"{a}-{b}" for a, _, b, _ in LINKS)]
    lines += ["| faults | " + " | ".join(targets) + " | all |", "|---" * (len(targets) + 2) + "|"]
    for kind in FAULTS:
        row = [faults[(kind, target)] for target in targets]
        lines.append(f"| {kind} | " + " | ".join(str(n) for n in row) + f" | {sum(row)} |")
    total = [sum(faults[(k, target)] for k in FAULTS) for target in targets]
    lines.append("| all | " + " | ".join(str(n) for n in total) + f" | {sum(total)} |")
    lines += ["", "| traffic | count |", "|---|---|"]
    lines.append(f"| TCP streams completed, sha256 equal | {tcp['completed']} ({mb(tcpBytes)} MiB each way) |")
    lines.append(f"| TCP streams failed | {tcp['failed']} |")
    for error, n in tcpErrors.most_common():
        lines.append(f"| &nbsp;&nbsp;failed with {error} | {n} |")
    lines.append(f"| UDP round trips ok | {udp['ok']} |")
    lines.append(f"| UDP round trips lost | {udp['lost']} |")
    for error, n in udpErrors.most_common():
        lines.append(f"| &nbsp;&nbsp;{'no echo within 1 s' if error == 'lost' else error} | {n} |")
    lines.append(f"| wrong data (TCP or UDP) | {wrong} |")
    lines.append(f"| packets in the clear after a SIGTERM of the client agent (by design) | {byDesign} |")
    checks = collections.OrderedDict()
    for p in phases:
        for name, ok, _ in p.checks:
            checks[name] = checks.get(name, True) and ok
    lines += ["", "| end check | result |", "|---|---|"]
    for name, ok in checks.items():
        lines.append(f"| {name} | {'ok' if ok else '**FAILED**'} |")
    if len(phases) == 1:
        p = phases[0]
        lines += [
            "",
            "| process | RSS warm-up → end (MiB) | fds warm-up → end | SIGTERM at the end (s) |",
            "|---|---|---|---|",
        ]
        for host in PROCESSES:
            if host in p.memory:
                r0, r1, f0, f1 = p.memory[host]
                lines.append(f"| {host} | {mb(r0)} → {mb(r1)} | {f0} → {f1} | {p.stopTimes.get(host, 0):.2f} |")
        lines.append(f"\nFresh echo served {p.settled:.1f} s after the last fault.")
    return lines


def report(phases, seed, seconds):
    lines = [
        "# Chaos run",
        "",
        f"`CHAOS_SEED={seed} CHAOS_SECONDS={seconds:g} CHAOS_KINDS={','.join(p.kind for p in phases)}"
        " .venv/bin/python -m bench.chaos` (bench/chaos.py, `make chaos`); "
        f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}.",
        "",
    ]
    for p in phases:
        lines += phaseTable(f"{p.kind}: {p.seconds:g} s of faults", [p]) + [""]
    if len(phases) > 1:
        lines += phaseTable("all phases", phases) + [""]
    broken = [f"{p.kind}: {b}" for p in phases for b in p.broken]
    lines.append("Rules broken: " + ("; ".join(broken) if broken else "none."))
    return "\n".join(lines) + "\n"


def runChaos(seconds, kinds, seed, output=REPORT, logdir=None):
    """
    Run one phase per kind; write and print the report; return the phases.
    """
    phases = []
    for kind in kinds:
        directory = tempfile.mkdtemp(prefix=f"chaos-{kind}-", dir=logdir)
        os.chmod(directory, 0o755)
        phase = Phase(kind, seconds, random.Random(f"{seed}-{kind}"), directory)
        phases.append(phase)
        try:
            phase.run()
        except Exception as e:
            phase.broken.append(f"the phase failed: {e!r}")
            say(f"chaos: phase {kind} failed: {e!r}")
        if phase.broken:
            say(f"chaos: {kind}: rules broken: {phase.broken}\nlogs in {directory}\n{getattr(phase, 'leftLogs', '')}")
        else:
            say(f"chaos: {kind}: logs in {directory}")
    text = report(phases, seed, seconds)
    if output:
        with open(output, "w") as f:
            f.write(text)
    say(text)
    return phases


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    traffic = sub.add_parser("traffic", help="(in the client host) the app's streams and round trips")
    traffic.add_argument("--seed", type=int, required=True)
    traffic.add_argument("--streams", type=int, default=STREAMS)
    traffic.add_argument("--host", default=SERVER)
    echo = sub.add_parser("udp-echo", help="(in the server host) a UDP echo server")
    echo.add_argument("--port", type=int, default=UDP_PORT)
    parser.add_argument("--output", default=REPORT)
    args = parser.parse_args(argv)
    if args.command == "traffic":
        return trafficMain(args)
    if args.command == "udp-echo":
        return udpEchoMain(args)
    if os.geteuid() != 0:
        raise SystemExit("chaos: run as root (it builds network namespaces)")
    seconds = float(os.environ.get("CHAOS_SECONDS", "600"))
    kinds = [k.strip() for k in os.environ.get("CHAOS_KINDS", ",".join(KINDS)).split(",") if k.strip()]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise SystemExit(f"chaos: CHAOS_KINDS: {sorted(unknown)} not among {', '.join(KINDS)}")
    seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(10**9))
    say(f"chaos: CHAOS_SEED={seed} CHAOS_SECONDS={seconds:g} CHAOS_KINDS={','.join(kinds)}")
    phases = runChaos(seconds, kinds, seed, args.output)
    return 1 if any(p.broken for p in phases) else 0


if __name__ == "__main__":
    sys.exit(main())
