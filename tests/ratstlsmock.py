"""
The mock librats_tls.so (tests/ratstls_mock), built once per test run.
"""

import atexit
import os
import shutil
import subprocess
import tempfile

from ent import ratstls

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_SCRIPT = os.path.join(HERE, "ratstls_mock", "build.sh")
PROJECT = os.path.dirname(HERE)

_root = None
_built = {}
_loaded = {}


def tmpRoot():
    global _root
    if _root is None:
        _root = tempfile.mkdtemp(prefix="ent-ratstls-test-")
        atexit.register(shutil.rmtree, _root, True)
    return _root


def build_mock(layout="2025", fresh=False):
    """
    Build the mock into a new directory (once per layout unless C{fresh});
    return the path of its librats_tls.so.
    """
    if not fresh and layout in _built:
        return _built[layout]
    out = tempfile.mkdtemp(prefix=f"v{layout}-", dir=tmpRoot())
    try:
        result = subprocess.run(
            ["sh", BUILD_SCRIPT, out, layout],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise AssertionError(f"cannot run {BUILD_SCRIPT}: {e}")
    if result.returncode != 0:
        raise AssertionError(
            "building the mock librats_tls.so failed (it needs gcc and libssl-dev):\n"
            + result.stdout
            + result.stderr
        )
    path = os.path.join(out, "librats_tls.so")
    if not fresh:
        _built[layout] = path
    return path


def mock_library(layout="2025"):
    if layout not in _loaded:
        _loaded[layout] = ratstls.load(build_mock(layout))
    return _loaded[layout]
