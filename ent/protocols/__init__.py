"""
Protocols: what travels on a leg and how a gateway passes it on.  The wire
format (L{ent.protocols.framing}: a 4-byte length, then the IP packet), the
checks a packet passes before it reaches the TUN and the announcement
(L{ent.protocols.packets}), the framed leg (L{ent.protocols.framed}), the
gateway's legs and router (L{ent.protocols.relay}, L{ent.protocols.router}),
write-through (L{ent.protocols.writethrough}), and the splice of two stream
connections (L{ent.protocols.splice}) that the socket relay and the
rootless agent's exposures share.

They carry framed packets over any stream transport (TCP, TLS, rats-tls,
vsock) and never know which one they run on.

May use: the shared basics, the legs (a peer's identity) and the counters
(L{ent.observability}).
"""
