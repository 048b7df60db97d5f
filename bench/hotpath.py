"""
The gateway's Python per frame, warm and without system calls: one agent
leg and one peer leg on a router, each frame handed to the leg's transport
as a read would, sent on through a socket stand-in that takes everything.

    .venv/bin/python -m bench.hotpath

What a crossing costs in place is several times this (cold caches, the
reactor, the system calls; README "Latency"); this is for comparing
changes to the per-frame path itself. Best of seven runs of 100000 round
trips, µs per frame.
"""

import socket
import sys
import time

from twisted.internet import tcp
from twisted.internet.task import Clock

from ent.eventloop import LeanEPollReactor
from ent.observability.stats import ServiceStats
from ent.protocols.framing import frame
from ent.protocols.relay import RelayLeg
from ent.protocols.router import Router


class TakesEverything:
    """
    Where the frames go: a socket that takes every byte at once.
    """

    def __init__(self, real):
        self.real = real
        self.sent = 0

    def send(self, data):
        self.sent += 1
        return len(data)

    def sendmsg(self, buffers):
        self.sent += 1
        return sum(map(len, buffers))

    def fileno(self):
        return self.real.fileno()

    def setsockopt(self, *args):
        pass


class Connection(tcp.Connection):
    def getPeer(self):
        return "bench"

    getHost = getPeer


def ipv4(src, dst):
    """
    A 52-byte IPv4 TCP packet (a pure ACK's size) from C{src} to C{dst}.
    """
    return bytes([0x45, 0, 0, 52, 0, 0, 0x40, 0, 64, 6, 0, 0, *src, *dst]) + bytes(32)


def main(rounds=100000):
    reactor = LeanEPollReactor()
    clock = Clock()
    router = Router(ServiceStats("entg", clock), clock)
    connections = []
    for side in ("agent", "peer"):
        ours, _theirs = socket.socketpair()
        leg = RelayLeg(router, side)
        connection = Connection(ours, leg, reactor)
        connection.connected = 1
        leg.makeConnection(connection)
        connection.socket = TakesEverything(ours)
        connections.append((connection, _theirs))
    (agent, _), (peer, _) = connections
    request = frame(ipv4((192, 168, 0, 1), (192, 168, 0, 254)))
    reply = frame(ipv4((192, 168, 0, 254), (192, 168, 0, 1)))

    def roundTrip():
        agent._dataReceived(request)
        peer._dataReceived(reply)

    for _ in range(5000):
        roundTrip()
    best = None
    for _ in range(7):
        started = time.perf_counter()
        for _ in range(rounds):
            roundTrip()
        took = time.perf_counter() - started
        best = took if best is None else min(best, took)
    if agent.socket.sent < 7 * rounds or peer.socket.sent < 7 * rounds:
        raise SystemExit("the router did not forward every frame: nothing measured")
    print(f"gateway, Python per frame: {best / rounds / 2 * 1e6:.2f} µs (best of 7 × {rounds} round trips)")
    reactor._poller.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
