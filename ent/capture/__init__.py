"""
Capture: where the host's IP packets enter and leave the tunnel, and which
of the host's connections are carried (C{--map}/C{--dport}) or exposed to it
(C{--expose}/C{--replay}), L{ent.capture.mapping}.

Today the one capture approach is the TUN device, which stays at its
documented path, C{ent/tun.py}: batches of packets come out through a
callback, batches go in through C{writePackets}, and the reader is an
C{IPushProducer}.  Another approach (a user-space TCP/IP stack for an agent
without TUN or root) lives in this package and offers the agent the same
narrow interface.

May use: the shared basics, the counters (L{ent.observability.stats}) and
host configuration (L{ent.hostconfig}).
"""
