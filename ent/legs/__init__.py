"""
Legs: the stream transports frames travel on between an agent and a gateway
and between gateways (TCP, TLS, rats-tls, vsock), as Twisted endpoints.

A leg's protection is applied to its endpoint (L{ent.legs.security}), so the
protocols above run unchanged on any of them.  The cffi binding to
librats_tls stays at its documented path, C{ent/ratstls.py}; the Twisted
transport built on it is L{ent.legs.ratstransport}, and the endpoints that
negotiate it (a thread per handshake) are L{ent.legs.ratsendpoints}; where
the library and its plugins are is checked by L{ent.legs.ratsplugins}.

May use: the shared basics (L{ent.errors}, L{ent.cli}) only.
"""
