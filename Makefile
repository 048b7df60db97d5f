.PHONY: setup demo test bench bench-scale bench-rootless bench-userstacks chaos

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

# Only the rootless rows: TUN and --stack user agents at 0, 5 and 20 ms of
# added round trip (bench/rootless.md), and libslirp against pasta
# (bench/userstacks.md).
bench-rootless:
	bash scripts/setup.sh passt slirp4netns
	.venv/bin/python -m bench.rootless
	.venv/bin/python -m bench.userstacks

bench-userstacks:
	bash scripts/setup.sh passt slirp4netns
	.venv/bin/python -m bench.userstacks

# Random faults under continuous traffic, one phase per leg kind (bench/chaos.py,
# bench/chaos.md); CHAOS_SECONDS per phase, CHAOS_KINDS, CHAOS_SEED.
CHAOS_SECONDS ?= 600
chaos:
	bash scripts/setup.sh
	CHAOS_SECONDS=$(CHAOS_SECONDS) .venv/bin/python -m bench.chaos
