"""
The benchmark: ENT against OpenVPN and plain kernel routing, in network
namespaces. Run it with ``make bench`` or ``python -m bench.run``.

By concern: bench/topology.py (the namespaces and the services on them),
bench/systems.py (the systems compared and how each path is built),
bench/measure.py (iperf3, ping, ping-pong, CPU and memory),
bench/report.py (results.md and the chart) and bench/run.py (the command).
bench/scale.py and bench/hops.py are the scale rows and the per-hop trace.
"""
