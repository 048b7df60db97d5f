"""
Checks that several end-to-end tests make of a running tunnel.
"""

import re
import signal


def sha256s(output):
    """
    The sha256 the echo client sent and the one it got back.
    """
    return (re.search(r"sha256 sent (\w+)", output).group(1),
            re.search(r"sha256 back (\w+)", output).group(1))


def assertEchoAndTransfer(testCase, tunnel, size=20_000_000):
    """
    A short echo, then C{size} bytes through the tunnel and back with the
    same sha256.
    """
    echo = tunnel.echoClient(1000)
    testCase.assertEqual(echo.returncode, 0, echo.stdout + echo.stderr + tunnel.logs())
    big = tunnel.echoClient(size, timeout=120)
    testCase.assertEqual(big.returncode, 0, big.stdout + big.stderr + tunnel.logs())
    sent, back = sha256s(big.stdout)
    testCase.assertEqual(sent, back)
    testCase.assertIn(f"received {size} bytes", big.stdout)


def assertStopsCleanly(testCase, tunnel):
    """
    SIGTERM every service: each exits within 2 s and nothing of ENT's is
    left in any namespace.
    """
    for host, (code, seconds) in tunnel.stopServices().items():
        testCase.assertIn(code, (0, -signal.SIGTERM), f"{host}: exit {code}\n{tunnel.logs()}")
        testCase.assertLess(seconds, 2.0, f"{host} took {seconds:.2f}s to stop\n{tunnel.logs()}")
    testCase.assertEqual(tunnel.leftovers(), {})
