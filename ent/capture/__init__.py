"""
Capture: where the host's IP packets enter and leave the tunnel, and which
of the host's connections are carried (C{--map}/C{--dport}) or exposed to it
(C{--expose}/C{--replay}), L{ent.capture.mapping}.

Two capture approaches offer the agent one narrow interface (batches of
packets come out through a callback, batches go in through
C{writePackets}, the reader is an C{IPushProducer}): the TUN device, at its
documented path C{ent/tun.py}, and the user-space TCP/IP stack of the
rootless agent (C{--stack user}): libslirp through cffi
(L{ent.capture.slirp}) driven by L{ent.capture.userstack}, with UDP done by
L{ent.capture.userudp}.

May use: the shared basics, the counters (L{ent.observability.stats}) and
host configuration (L{ent.hostconfig}).
"""
