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
            ["sh", BUILD_SCRIPT, out, layout], check=False, capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise AssertionError(f"cannot run {BUILD_SCRIPT}: {e}")
    if result.returncode != 0:
        raise AssertionError(
            "building the mock librats_tls.so failed (it needs gcc and libssl-dev):\n" + result.stdout + result.stderr
        )
    path = os.path.join(out, "librats_tls.so")
    if not fresh:
        _built[layout] = path
    return path


def mock_library(layout="2025"):
    if layout not in _loaded:
        _loaded[layout] = ratstls.load(build_mock(layout))
    return _loaded[layout]


#: A real librats_tls.so to run the rats-tls tests against instead of the
#: mock (scripts/test.sh sets it, one build per trial process: two builds
#: in one process kill it).
TEST_LIBRARY_ENV = "ENT_TEST_RATS_TLS_LIB"

#: The real library under test, or None when the tests use the mock.
REAL_LIBRARY = os.environ.get(TEST_LIBRARY_ENV) or None

#: C{skip} for tests of what only the mock does (its C-level promises, its
#: evidence format, loading several builds in one process); they run in
#: the mock run.
MOCK_ONLY = (
    f"mock-only: checks what only the mock librats_tls does (real library {REAL_LIBRARY} selected)"
    if REAL_LIBRARY
    else None
)

#: C{skip} for tests that need a real librats_tls (its plugins, e.g. the
#: ent_sim attester and verifier of tests/ratstls_sim); they run in the
#: real-library runs of scripts/test.sh.
REAL_ONLY = (
    None
    if REAL_LIBRARY
    else f"real-library only: needs a real librats_tls with the ent_sim plugins (set {TEST_LIBRARY_ENV};"
    " scripts/test.sh does)"
)


def library_path_under_test():
    """
    The librats_tls.so the rats-tls tests run against: C{$ENT_TEST_RATS_TLS_LIB}
    or the mock.  A real library named but missing fails the test: CI must
    not pass without it.
    """
    if REAL_LIBRARY is None:
        return build_mock()
    if not os.path.isfile(REAL_LIBRARY):
        raise AssertionError(
            f"{TEST_LIBRARY_ENV}={REAL_LIBRARY} does not exist: scripts/ratstls-build.sh builds"
            " the real libraries from ../shared/rats-tls (is it there?)"
        )
    return REAL_LIBRARY


def library_under_test():
    """
    The loaded library the rats-tls tests run against (see L{library_path_under_test}).
    """
    path = library_path_under_test()
    if path not in _loaded:
        _loaded[path] = ratstls.load(path)
    return _loaded[path]
