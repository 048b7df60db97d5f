"""
Host configuration: what an agent sets up on its host around the TUN device
and undoes when it stops: the nftables table (L{ent.hostconfig.netfilter}),
the capture policy route and rules (L{ent.hostconfig.routing}), the table's
fail-closed switch while it runs (L{ent.hostconfig.guard}), and
C{python -m ent cleanup} for what a killed agent left.

The steps that need pyroute2 run in a short-lived child process
(L{ent.hostconfig.steps}), so the agent itself never loads it.

May use: the shared basics only.
"""
