"""
Re-attestation: a rats-tls leg's evidence is checked again when the leg
reaches the age of C{--reattest}.

rats-tls cannot renegotiate a session, so a new handshake is a new
connection.  The side that connected the leg closes it at a random point
between 80 % and 95 % of that age (so that legs which came up together do
not all go at once) and reconnects at once, without its usual back-off; the
connections inside the tunnel see a pause of one handshake, as they would
a gateway restart.  The side that accepted the leg closes it at 110 % of
the age plus the handshake budget, so that a party that never reconnects
by itself (an ENG agent, or one that avoids a new check) is checked again
all the same.
"""

import random

from twisted.logger import Logger

# Where in its life a connecting side re-handshakes (fractions of the age).
EARLIEST = 0.80
LATEST = 0.95
# The accepting side's deadline: this fraction of the age, plus the budget
# of the handshake that the connecting side should have made by then.
DEADLINE = 1.10
HANDSHAKE_BUDGET = 10.0


def isRatsTls(transport):
    return hasattr(transport, "getPeerEvidence")


class QuickRetry:
    """
    A C{ClientService} retry policy that reconnects at once after a planned
    close (L{soon}), and backs off as C{policy} says after any other.
    """

    def __init__(self, policy, delay=0.0):
        self.policy = policy
        self.delay = delay
        self._planned = False

    def soon(self):
        self._planned = True

    def __call__(self, attempt):
        if self._planned:
            self._planned = False
            return self.delay
        return self.policy(attempt)


class Reattestation:
    """
    Schedules the re-handshake of the rats-tls legs of one service.

    C{seconds} is C{--reattest}; C{counted} is called with the leg's name
    each time a leg is closed for re-attestation.
    """

    log = Logger()

    def __init__(self, clock, seconds, counted=None, rng=None):
        self.clock = clock
        self.seconds = seconds
        self.counted = counted
        self.random = rng or random.Random()

    def watch(self, leg, connecting=None, retry=None):
        """
        Schedule C{leg}'s re-handshake if it is a rats-tls leg; returns the
        delayed call (cancel it when the leg goes down), or C{None}.
        """
        if not self.seconds or not isRatsTls(leg.transport):
            return None
        if connecting is None:
            connecting = leg.connecting
        if connecting:
            delay = self.seconds * self.random.uniform(EARLIEST, LATEST)
        else:
            delay = self.seconds * DEADLINE + HANDSHAKE_BUDGET
        return self.clock.callLater(delay, self._due, leg, connecting, retry or getattr(leg, "retry", None))

    def _due(self, leg, connecting, retry):
        leg.reattestation = None
        if connecting and retry is not None:
            retry.soon()
        if self.counted is not None:
            self.counted(leg.leg)
        self.log.info(
            "{leg} leg {peer}: {age}s old, closing it for a new rats-tls handshake (--reattest)",
            leg=leg.leg,
            peer=leg.peerName(),
            age=self.seconds if connecting else round(self.seconds * DEADLINE + HANDSHAKE_BUDGET, 1),
        )
        leg.reattesting = True
        transport = leg.transport
        if getattr(transport, "producer", None) is not None:
            # Whatever feeds the leg must not hold its close.
            transport.unregisterProducer()
        leg.close()
