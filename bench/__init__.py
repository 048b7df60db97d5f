"""
The benchmark: ENT against OpenVPN and plain kernel routing, in network
namespaces. Run it with ``make bench`` or ``python -m bench.run``.
"""
