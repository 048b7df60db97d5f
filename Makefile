.PHONY: setup demo test bench bench-scale

setup:
	bash scripts/setup.sh

demo:
	bash scripts/demo.sh

test:
	bash scripts/test.sh

# Not part of CI: iperf3 and ping through ENT, OpenVPN and the kernel path.
bench:
	bash scripts/bench.sh

# Only the scale rows: one gateway, 1, 100 and 1000 agents, and the routing
# cost against main's relay (bench/scale.md).
bench-scale:
	bash scripts/setup.sh
	.venv/bin/python -m bench.scale
