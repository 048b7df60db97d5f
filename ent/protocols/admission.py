"""
Who may join: each leg is matched against the C{--policy} once it is
authenticated and before it is attached to anything.

A leg's facts (its TCP source, its certificate's names, its rats-tls
evidence) are read once from its transport (L{legFacts}); L{Admission}
matches them against the policy in force, counts a refusal by reason and
logs it at most once a minute per source, with the key that differed.
SIGHUP swaps the policy (L{Admission.reload}); the services then ask
L{Admission.stillAdmitted} of every attached leg.

Without a policy every leg is admitted with no identity, as in ENG.
"""

import ipaddress
from dataclasses import replace

from twisted.logger import Logger

from ent.errors import PolicyError
from ent.legs.identity import peerIdentities
from ent.legs.policy import LegFacts, Refusal, loadPolicy
from ent.legs.tls import isTls
from ent.ratelimit import OncePer


def legFacts(transport, role):
    """
    What is known of the party at the other end of C{transport}.
    """
    peer = transport.getPeer()
    try:
        source = ipaddress.ip_address(getattr(peer, "host", ""))
    except ValueError:
        source = None  # unix, vsock: no IP source
    getEvidence = getattr(transport, "getPeerEvidence", None)
    if getEvidence is not None:
        kind = "rats-tls"
        evidence = getEvidence()
    else:
        kind = "tls" if isTls(transport) else "tcp"
        evidence = None
    names = peerIdentities(transport)
    return LegFacts(role=role, source=source, tlsNames=tuple(names), evidence=evidence, kind=kind)


def describeEvidence(facts):
    """
    The evidence of a leg as status and logs show it: C{"-"} for none.
    """
    evidence = facts.evidence if facts is not None else None
    return evidence.summary() if evidence is not None else "-"


class Admission:
    """
    The policy in force for one service, and the refusals it made.

    C{policy} is an L{ent.legs.policy.Policy} or C{None}; C{refused} is
    called with C{(leg, reason)} for each refusal, to count it.
    """

    log = Logger()
    # At most one refusal line per source and role in this many seconds,
    # and at most this many sources remembered (a flood of sources is
    # counted, not logged, once the table is full).
    logInterval = 60.0
    maxLogged = 4096

    def __init__(self, policy, clock, refused):
        self.policy = policy
        self.clock = clock
        self._refused = refused
        self._logAllowed = OncePer(clock, self.logInterval, self.maxLogged)
        self.generation = 0

    @property
    def active(self):
        return self.policy is not None

    def admit(self, facts, leg, peer):
        """
        The L{Identity} C{facts} match, C{None} without a policy, or a
        L{Refusal} (counted and logged).
        """
        if self.policy is None:
            return None
        result = self.policy.match(facts)
        if isinstance(result, Refusal):
            if not self.policy.strict:
                # --allowed-ips: whom it does not name learns its
                # addresses (the router refuses an unnamed TLS agent).
                return None
            self.refuse(facts, leg, peer, result)
        return result

    def refuse(self, facts, leg, peer, refusal):
        self._refused(leg, refusal.reason)
        if not self._logAllowed((facts.source, facts.role)):
            return
        self.log.error(
            "{leg} {peer} refused by the policy: {detail} (logged at most once a minute per source)",
            leg=leg,
            peer=peer,
            detail=refusal.detail,
            key=refusal.key,
            identity=refusal.identity,
            reason=refusal.reason,
            evidence=describeEvidence(facts),
        )

    def stillAdmitted(self, facts, identity):
        """
        Whether a leg admitted as C{identity} is admitted as the very same
        identity (same name and grants) by the policy now in force.
        """
        if self.policy is None:
            return True
        result = self.policy.match(facts)
        if isinstance(result, Refusal) or identity is None:
            return False
        # Where in the file it is written does not matter.
        return replace(result, line=0) == replace(identity, line=0)

    def reload(self):
        """
        Re-read the policy's file; keep the old policy if the new one is
        wrong.  Returns whether the policy changed.
        """
        if self.policy is None or self.policy.path is None:
            return False
        path = self.policy.path
        try:
            policy = loadPolicy(path)
        except PolicyError as e:
            self.log.error("policy not reloaded, the old one stays in force: {error}", error=str(e))
            return False
        self.policy = policy
        self.generation += 1
        self.log.info("policy reloaded from {path}: {count} identities", path=path, count=len(policy.identities))
        return True
