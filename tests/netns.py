"""
Test helpers for privileged tests: they run for real as root, and fail
(never skip) when they cannot.
"""

import ctypes
import os
import subprocess
import uuid

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def requireRoot(testCase):
    """
    Fail, with the reason, where the privileged tests cannot run.
    """
    if os.geteuid() != 0:
        testCase.fail("privileged test: run the test suite as root (see README)")
    for path in ("/dev/net/tun",):
        if not os.path.exists(path):
            testCase.fail(f"privileged test: {path} is missing")


def _setns(fd):
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def enterNewNamespace(testCase):
    """
    Create a network namespace, move the calling thread (the reactor's)
    into it, and arrange for the test's clean-up to move back and delete it.
    """
    requireRoot(testCase)
    name = f"enttest-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)

    def leave():
        try:
            _setns(original)
        finally:
            os.close(original)
            subprocess.run(["ip", "netns", "del", name], check=False)

    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
    except BaseException:
        leave()
        raise
    testCase.addCleanup(leave)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    return name
