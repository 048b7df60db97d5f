.PHONY: setup demo test bench

setup:
	bash scripts/setup.sh

demo:
	bash scripts/demo.sh

test:
	bash scripts/test.sh

# Not part of CI: iperf3 and ping through ENT, OpenVPN and the kernel path.
bench:
	bash scripts/bench.sh
