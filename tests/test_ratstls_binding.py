"""
Tests for L{ent.ratstls}, against the library under test: the mock
librats_tls.so of tests/ratstls_mock, built here with gcc and OpenSSL
(missing tools fail the tests: they are part of the test set-up), or the
real build named by $ENT_TEST_RATS_TLS_LIB (scripts/test.sh runs this module
once per real build).  Tests of what only the mock does are marked
mock-only and run in the mock run.

Real sockets and real threads; every wait has a time limit, after which the
test's sockets are shut down so that no thread stays blocked.
"""

import hashlib
import os
import select
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

from twisted.trial import unittest

from ent import ratstls
from ent.errors import ConfigurationError, RatsTlsClosed, RatsTlsError, RatsTlsLibraryError, StartupError
from ent.legs.evidence import Evidence
from ent.ratstls import RatsTlsConfig, ffi
from tests.ratstlsmock import MOCK_ONLY, PROJECT, REAL_LIBRARY, build_mock, library_under_test, mock_library, tmpRoot

TIMEOUT = 10.0
QUIET = ratstls.LOG_NONE


def skipIf(reason):
    """
    Mark a test skipped with C{reason} if it is not C{None} (trial's
    C{skip} attribute, per test).
    """

    def mark(test):
        if reason is not None:
            test.skip = reason
        return test

    return mark


def cfg(**kwargs):
    kwargs.setdefault("log_level", QUIET)
    return RatsTlsConfig(**kwargs)


class Call:
    """
    A function run in a daemon thread, its outcome kept for L{TestCase.wait}.
    """

    def __init__(self, function, *args):
        self.value = None
        self.error = None
        self.thread = threading.Thread(target=self._run, args=(function, args), daemon=True)
        self.thread.start()

    def _run(self, function, args):
        try:
            self.value = function(*args)
        except Exception as e:
            self.error = e

    def done(self):
        return not self.thread.is_alive()


class TestCase(unittest.TestCase):
    def setUp(self):
        self.sockets = []
        self.sessions = []
        for name in (ratstls.LIBRARY_ENV, ratstls.PLUGIN_DIR_ENV):
            self.setenv(name, None)
        self.addCleanup(self._release)

    def setenv(self, name, value):
        old = os.environ.get(name)

        def restore():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old

        self.addCleanup(restore)
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value

    def _shutdown_sockets(self):
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _release(self):
        # Free the handles before their fds close, so nothing writes into a
        # reused fd; shutting the sockets down releases blocked calls.
        for s in self.sessions:
            s.cleanup()
        self._shutdown_sockets()
        for s in self.sessions:
            s.wait_cleaned(5)
        for s in self.sockets:
            s.close()

    def wait(self, call, timeout=TIMEOUT):
        """
        The result of C{call}, raising what it raised; on time-out, release
        the test's sockets and fail.
        """
        call.thread.join(timeout)
        if call.thread.is_alive():
            self._shutdown_sockets()
            call.thread.join(5)
            self.fail(f"timed out after {timeout}s")
        if call.error is not None:
            raise call.error
        return call.value

    def socketpair(self):
        a, b = socket.socketpair()
        self.sockets += [a, b]
        return a, b

    def tcp_pair(self):
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        client.settimeout(None)
        self.sockets.append(client)
        listener.settimeout(TIMEOUT)
        server, _ = listener.accept()
        server.settimeout(None)
        self.sockets.append(server)
        return server, client

    def session(self, library, config, verify=None):
        s = ratstls.RatsTlsSession(library, config, verify)
        self.sessions.append(s)
        return s

    def connected(self, library=None, server_config=None, client_config=None, tcp=False, **kw):
        """
        A negotiated server and client session over a socketpair (or TCP).

        @return: (server session, client session, server socket, client socket)
        """
        library = library or library_under_test()
        s_sock, c_sock = self.tcp_pair() if tcp else self.socketpair()
        server = self.session(library, server_config or cfg(server=True), kw.get("server_verify"))
        client = self.session(library, client_config or cfg(), kw.get("client_verify"))
        s_call = Call(server.negotiate, s_sock)
        c_call = Call(client.negotiate, c_sock)
        self.wait(c_call)
        self.wait(s_call)
        return server, client, s_sock, c_sock

    def assertFailsAt(self, step, call, code=None):
        """
        C{call} raised a L{RatsTlsError} naming C{step}; return it.
        """
        try:
            self.wait(call)
        except RatsTlsError as e:
            self.assertEqual(e.step, step)
            self.assertIn(step, str(e))
            if code is not None:
                self.assertEqual(e.code, code)
            return e
        self.fail(f"no RatsTlsError from {step}")

    def exchange(self, server, client):
        client.transmit(b"ping from client")
        self.assertEqual(self.wait(Call(server.receive)), b"ping from client")
        server.transmit(b"pong from server")
        self.assertEqual(self.wait(Call(client.receive)), b"pong from server")


class LayoutTests(TestCase):
    """
    Both layouts of rats_tls_conf_t, as measured on the real libraries.
    """

    def test_sizes(self):
        self.assertEqual(ffi.sizeof("rats_tls_conf_v2022_t"), 184)
        self.assertEqual(ffi.sizeof("rats_tls_conf_v2025_t"), 192)
        self.assertEqual(ffi.sizeof("claim_t"), 24)
        self.assertEqual(ffi.sizeof("rats_tls_quote_sgx_epid_t"), 18)

    def test_common_offsets(self):
        for layout in (ratstls.LAYOUT_V2022, ratstls.LAYOUT_V2025):
            conf = ratstls.CONF_TYPES[layout]
            for field, offset in (
                ("api_version", 0),
                ("flags", 8),
                ("log_level", 16),
                ("tls_type", 20),
                ("attester_type", 52),
                ("verifier_type", 84),
                ("crypto_type", 116),
                ("cert_algo", 148),
            ):
                self.assertEqual(ffi.offsetof(conf, field), offset, (layout, field))
            fields = dict(ffi.typeof(conf).fields)
            for field in ("log_level", "cert_algo"):
                self.assertEqual(ffi.sizeof(fields[field].type), 4, (layout, field))
            for field in ("tls_type", "attester_type", "verifier_type", "crypto_type"):
                self.assertEqual(ffi.sizeof(fields[field].type), 32, (layout, field))

    def test_v2022_offsets(self):
        conf = "rats_tls_conf_v2022_t"
        self.assertEqual(ffi.offsetof(conf, "enclave_id"), 152)
        self.assertEqual(ffi.offsetof(conf, "quote_sgx_epid"), 160)
        self.assertEqual(ffi.offsetof(conf, "quote_sgx_ecdsa"), 178)

    def test_v2025_offsets(self):
        conf = "rats_tls_conf_v2025_t"
        self.assertEqual(ffi.offsetof(conf, "custom_claims"), 152)
        self.assertEqual(ffi.offsetof(conf, "custom_claims_length"), 160)
        self.assertEqual(ffi.offsetof(conf, "quote_sgx_epid"), 168)
        self.assertEqual(ffi.offsetof(conf, "quote_sgx_ecdsa"), 186)

    @skipIf(MOCK_ONLY)
    def test_make_conf(self):
        """
        Mock-only: loads the mock in both layouts.
        A config lands in the conf struct of the library's layout.
        """
        for layout in ("2022", "2025"):
            library = mock_library(layout)
            conf = library.make_conf(RatsTlsConfig(attester="nullattester", server=True, mutual=True, log_level=2))
            self.assertEqual(ffi.sizeof(conf[0]), 184 if layout == "2022" else 192)
            self.assertEqual(conf.api_version, 1)
            self.assertEqual(conf.flags, 3)
            self.assertEqual(conf.log_level, 2)
            self.assertEqual(conf.cert_algo, ratstls.CERT_ALGO_ECC_256_SHA256)
            self.assertEqual(ffi.string(conf.attester_type), b"nullattester")
            self.assertEqual(ffi.string(conf.verifier_type), b"nullverifier")
            self.assertEqual(ffi.string(conf.tls_type), b"openssl")
            self.assertEqual(ffi.string(conf.crypto_type), b"openssl")

    def test_log_level_from_environment(self):
        library = library_under_test()
        self.setenv(ratstls.LOG_LEVEL_ENV, "debug")
        self.assertEqual(library.make_conf(RatsTlsConfig()).log_level, ratstls.LOG_DEBUG)
        self.setenv(ratstls.LOG_LEVEL_ENV, None)
        self.assertEqual(library.make_conf(RatsTlsConfig()).log_level, ratstls.LOG_ERROR)

    def test_name_too_long(self):
        with self.assertRaises(ConfigurationError):
            library_under_test().make_conf(RatsTlsConfig(attester="x" * 32))

    def test_library_under_test_layout(self):
        """
        The library under test is detected with the layout scripts/test.sh
        says it has ($ENT_TEST_RATS_TLS_LAYOUT; the mock is v2025).
        """
        expected = os.environ.get("ENT_TEST_RATS_TLS_LAYOUT", ratstls.LAYOUT_V2025)
        library = library_under_test()
        self.assertEqual(library.layout, expected)
        self.assertEqual(ffi.sizeof(library.make_conf(cfg())[0]), 184 if expected == "v2022" else 192)

    @skipIf(MOCK_ONLY)
    def test_detect_v2025(self):
        """
        Mock-only: the v2025 mock (a real build is checked by test_library_under_test_layout).
        """
        library = mock_library("2025")
        self.assertEqual(library.layout, ratstls.LAYOUT_V2025)
        self.assertEqual(library.conf_type, "rats_tls_conf_v2025_t")

    @skipIf(MOCK_ONLY)
    def test_detect_v2022(self):
        """
        Mock-only: the v2022 mock (a real build is checked by test_library_under_test_layout).
        """
        library = mock_library("2022")
        self.assertEqual(library.layout, ratstls.LAYOUT_V2022)
        self.assertEqual(library.conf_type, "rats_tls_conf_v2022_t")

    @skipIf(MOCK_ONLY)
    def test_detect_in_own_process(self):
        """
        Mock-only: builds and runs both layouts of the mock.
        Detection is the same when a process loads only one library.
        """
        for layout in ("2022", "2025"):
            out = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    "import sys; from ent import ratstls; print(ratstls.load(sys.argv[1]).layout)",
                    build_mock(layout),
                ],
                cwd=PROJECT,
                check=False,
                capture_output=True,
                text=True,
                timeout=60,
            )
            self.assertEqual((out.returncode, out.stdout.strip()), (0, "v" + layout), out.stderr)

    @skipIf(MOCK_ONLY)
    def test_both_layouts_in_one_process(self):
        """
        Mock-only: two real builds in one process kill it.
        Two libraries loaded by distinct paths each work with their own layout.
        """
        for layout in ("2022", "2025"):
            server, client, _, _ = self.connected(mock_library(layout))
            self.exchange(server, client)


class LoadTests(TestCase):
    """
    Checks made before dlopen, which would otherwise kill the process.

    Mock-only: they build and load broken copies of the mock.
    """

    skip = MOCK_ONLY

    def assertLibraryError(self, path=None, **kw):
        with self.assertRaises(RatsTlsLibraryError) as caught:
            ratstls.load(path, **kw)
        error = caught.exception
        self.assertIsInstance(error, StartupError)
        self.assertEqual(error.step, "load")
        message = str(error)
        self.assertIn("--rats-tls-lib", message)
        self.assertIn("ENT_RATS_TLS_LIB", message)
        return message

    def assertLoadingKills(self, path):
        """
        Loading C{path} without our checks would really exit(1).
        """
        out = subprocess.run(
            [sys.executable, "-c", "import ctypes, sys; ctypes.CDLL(sys.argv[1]); print('alive')", path],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(out.returncode, 1)
        self.assertIn("FATAL", out.stderr)
        self.assertNotIn("alive", out.stdout)

    def test_missing_library(self):
        path = os.path.join(tmpRoot(), "nowhere", "librats_tls.so")
        message = self.assertLibraryError(path)
        self.assertIn(path, message)
        self.assertIn("not found", message)

    def test_default_path(self):
        self.assertEqual(ratstls.default_library_path(), ratstls.DEFAULT_LIBRARY)
        self.setenv(ratstls.LIBRARY_ENV, "/elsewhere/librats_tls.so")
        self.assertEqual(ratstls.default_library_path(), "/elsewhere/librats_tls.so")
        self.assertIn("/elsewhere/librats_tls.so", self.assertLibraryError())

    def test_path_from_environment(self):
        path = build_mock()
        self.setenv(ratstls.LIBRARY_ENV, path)
        library = ratstls.load()
        self.assertEqual(library.path, path)
        self.assertEqual(library.plugin_dir, os.path.join(os.path.dirname(path), "rats-tls"))

    def test_missing_plugin_directory(self):
        path = build_mock(fresh=True)
        attesters = os.path.join(os.path.dirname(path), "rats-tls", "attesters")
        shutil.rmtree(attesters)
        message = self.assertLibraryError(path)
        self.assertIn(attesters, message)
        self.assertIn("exit(1)", message)
        self.assertNotIn("verifiers", message)
        self.assertLoadingKills(path)

    def test_empty_plugin_directory(self):
        path = build_mock("2022", fresh=True)
        verifiers = os.path.join(os.path.dirname(path), "rats-tls", "verifiers")
        for name in os.listdir(verifiers):
            os.unlink(os.path.join(verifiers, name))
        self.assertIn(verifiers, self.assertLibraryError(path))
        self.assertLoadingKills(path)

    def test_compiled_in_directory_is_checked(self):
        """
        The directories checked are those compiled into the library, found in
        its strings, not whatever lies beside a copy of it.
        """
        original = build_mock(fresh=True)
        elsewhere = tempfile.mkdtemp(dir=tmpRoot())
        copy = os.path.join(elsewhere, "librats_tls.so")
        shutil.copy(original, copy)
        self.assertEqual(ratstls.load(copy).plugin_dir, os.path.join(os.path.dirname(original), "rats-tls"))
        # Complete plugin directories beside the copy do not help once the
        # compiled-in ones are gone.
        shutil.copytree(os.path.join(os.path.dirname(original), "rats-tls"), os.path.join(elsewhere, "rats-tls"))
        shutil.rmtree(os.path.join(os.path.dirname(original), "rats-tls", "tls-wrappers"))
        self.assertIn("tls-wrappers", self.assertLibraryError(copy))
        self.assertLoadingKills(copy)

    def test_plugin_directory_override(self):
        path = build_mock()
        empty = tempfile.mkdtemp(dir=tmpRoot())
        self.setenv(ratstls.PLUGIN_DIR_ENV, empty)
        message = self.assertLibraryError(path)
        for kind in ratstls.PLUGIN_KINDS:
            self.assertIn(os.path.join(empty, kind), message)
        real = os.path.join(os.path.dirname(path), "rats-tls")
        self.setenv(ratstls.PLUGIN_DIR_ENV, real)
        self.assertEqual(ratstls.load(path).plugin_dir, real)

    def test_not_a_library(self):
        directory = tempfile.mkdtemp(dir=tmpRoot())
        for kind in ratstls.PLUGIN_KINDS:
            os.makedirs(os.path.join(directory, "rats-tls", kind))
            open(os.path.join(directory, "rats-tls", kind, "x.so"), "w").close()
        path = os.path.join(directory, "librats_tls.so")
        with open(path, "wb") as f:
            f.write(b"not an ELF file")
        self.assertIn("cannot load", self.assertLibraryError(path))


class SessionTests(TestCase):
    """
    Handshakes and data over real sockets with real threads.
    """

    def test_handshake_and_data(self):
        server, client, _, _ = self.connected()
        self.exchange(server, client)

    def test_mutual_over_tcp(self):
        """
        With mutual attestation each side checks the other's evidence: null
        evidence, which the callback sees as an L{Evidence} of kind "none"
        (the mock passes a zeroed rtls_evidence_t of its layout).
        """
        seen = {"server": [], "client": []}

        def verifier(side):
            def verify(evidence):
                seen[side].append(evidence)
                return True

            return verify

        server, client, _, _ = self.connected(
            server_config=cfg(server=True, mutual=True),
            client_config=cfg(mutual=True),
            tcp=True,
            server_verify=verifier("server"),
            client_verify=verifier("client"),
        )
        self.exchange(server, client)
        for side, evidences in seen.items():
            if REAL_LIBRARY:
                # The v2022 library calls the server's callback twice.
                self.assertGreaterEqual(len(evidences), 1, side)
            else:
                self.assertEqual(len(evidences), 1, side)
            self.assertEqual(set(evidences), {Evidence()}, side)
        self.assertEqual(server.evidence, Evidence())
        self.assertEqual(client.evidence, Evidence())

    def test_server_verifies_client_only_if_mutual(self):
        called = []
        server, client, _, _ = self.connected(server_verify=lambda ev: called.append(1) or True)
        self.exchange(server, client)
        self.assertEqual(called, [])

    def test_receive_returns_one_record(self):
        server, client, _, _ = self.connected()
        for message in (b"one", b"two", b"three"):
            client.transmit(message)
        time.sleep(0.1)
        self.assertEqual(self.wait(Call(server.receive, 65536)), b"one")
        self.assertEqual(self.wait(Call(server.receive, 65536)), b"two")
        self.assertEqual(self.wait(Call(server.receive, 65536)), b"three")

    def test_receive_maxsize(self):
        server, client, _, _ = self.connected()
        client.transmit(bytearray(range(256)) * 4)
        first = self.wait(Call(server.receive, 10))
        rest = self.wait(Call(server.receive, 4096))
        self.assertEqual(first + rest, bytes(range(256)) * 4)
        self.assertEqual(len(first), 10)
        with self.assertRaises(ValueError):
            server.receive(0)

    def test_transmit_accepts_buffers(self):
        server, client, _, _ = self.connected()
        client.transmit(memoryview(b"xxhelloxx")[2:7])
        client.transmit(b"")
        client.transmit(bytearray(b"!"))
        got = self.wait(Call(server.receive))
        if got == b"hello":
            got += self.wait(Call(server.receive))
        self.assertEqual(got, b"hello!")

    def test_second_thread_refused(self):
        """
        While one thread is inside the library with a session (a receive
        blocked on a blocking fd), a call from another thread is refused and
        counted instead of entering: OpenSSL sessions are not thread-safe.
        The first call goes on undisturbed.
        """
        server, client, _, _ = self.connected()
        reader = Call(server.receive)
        time.sleep(0.2)
        self.assertFalse(reader.done())
        before = ratstls.RatsTlsSession.concurrent_entries
        for step, call in (
            ("transmit", lambda: server.transmit(b"x")),
            ("receive", lambda: server.receive()),
            ("transmit", lambda: server.send(b"x")),
        ):
            with self.assertRaises(RatsTlsError) as caught:
                call()
            self.assertEqual(caught.exception.step, "concurrent")
            self.assertIn(f"{step} refused", str(caught.exception))
        self.assertEqual(ratstls.RatsTlsSession.concurrent_entries - before, 3)
        client.transmit(b"after the refusals")
        self.assertEqual(self.wait(reader), b"after the refusals")
        self.exchange(server, client)

    def test_nonblocking_fd_after_handshake(self):
        """
        Once negotiated, the fd may be made non-blocking: receive returns
        None and send 0 when the socket is not ready, and the session goes
        on working; a send the socket took part-way is completed by
        retrying it, and the bytes arrive intact and in order.
        """
        server, client, s_sock, c_sock = self.connected(tcp=True)
        s_sock.setblocking(False)
        c_sock.setblocking(False)
        self.assertIsNone(server.receive(65536))
        self.assertIsNone(client.receive(65536))
        payload = os.urandom(8 * 1024 * 1024)
        offset = 0
        blocked = 0
        received = bytearray()
        deadline = time.monotonic() + 30
        while len(received) < len(payload):
            self.assertLess(time.monotonic(), deadline, "no progress")
            if offset < len(payload):
                sent = client.send(memoryview(payload)[offset:])
                blocked += sent == 0
                offset += sent
            chunk = server.receive(65536)
            if chunk is not None:
                received += chunk
            elif offset == len(payload) or blocked:
                select.select([s_sock], [c_sock], [], 0.1)
        self.assertGreater(blocked, 0, "the socket never filled up: no retry was tested")
        self.assertEqual(hashlib.sha256(received).digest(), hashlib.sha256(payload).digest())
        self.assertEqual(client.send(b"and back"), 8)
        server.send(b"pong")
        for sock, session, expected in ((s_sock, server, b"and back"), (c_sock, client, b"pong")):
            select.select([sock], [], [], TIMEOUT)
            self.assertEqual(session.receive(65536), expected)

    def test_send_retry_must_repeat(self):
        """
        After a send the socket took only part of, a retry with less data
        than is part-way out is refused (OpenSSL would fail the session).
        """
        server, client, _, c_sock = self.connected(tcp=True)
        c_sock.setblocking(False)
        data = b"z" * (1 << 20)
        while client.send(data, limit=len(data)):
            pass
        with self.assertRaises(ValueError):
            client.send(b"short")

    def test_peer_cleanup(self):
        """
        The peer's cleanup sends close_notify: receive raises RatsTlsClosed
        (code -2), and keeps doing so.
        """
        server, client, _, _ = self.connected()
        self.assertTrue(client.cleanup())
        for _ in range(2):
            e = self.assertFailsAt("receive", Call(server.receive), ratstls.ERR_INVALID)
            self.assertIsInstance(e, RatsTlsClosed)

    def test_peer_abrupt_close(self):
        server, _, _, c_sock = self.connected(tcp=True)
        reader = Call(server.receive)
        time.sleep(0.1)
        c_sock.shutdown(socket.SHUT_RDWR)
        e = self.assertFailsAt("receive", reader, ratstls.ERR_INVALID)
        self.assertIsInstance(e, RatsTlsClosed)

    def test_transmit_after_peer_gone(self):
        server, client, _, c_sock = self.connected(tcp=True)
        client.cleanup()
        c_sock.close()
        self.sockets.remove(c_sock)
        for _ in range(20):
            try:
                server.transmit(b"anyone there?")
            except RatsTlsClosed as e:
                self.assertEqual((e.step, e.code), ("transmit", ratstls.ERR_INVALID))
                break
            time.sleep(0.05)
        else:
            self.fail("transmit kept succeeding after the peer left")

    def test_cleanup_leaves_fd_open(self):
        """
        cleanup frees the session but the socket goes on working.
        """
        server, client, s_sock, c_sock = self.connected()
        self.assertTrue(client.cleanup())
        self.assertTrue(client.cleanup())  # idempotent
        self.assertTrue(client.wait_cleaned(0))
        os.fstat(c_sock.fileno())
        self.assertFailsAt("receive", Call(server.receive))
        c_sock.sendall(b"plain bytes")
        s_sock.settimeout(TIMEOUT)
        self.assertEqual(s_sock.recv(100), b"plain bytes")

    def test_calls_after_cleanup(self):
        _, client, _, c_sock = self.connected()
        client.cleanup()
        self.assertTrue(client.closed)
        for step, call in (
            ("receive", lambda: client.receive()),
            ("transmit", lambda: client.transmit(b"x")),
            ("negotiate", lambda: client.negotiate(c_sock)),
        ):
            with self.assertRaises(RatsTlsClosed) as caught:
                call()
            self.assertEqual(caught.exception.step, step)

    def test_cleanup_while_reader_blocked(self):
        """
        cleanup with a receive blocked in another thread defers the C cleanup
        to when that receive returns, which shutting the socket down causes.
        """
        server, _, s_sock, _ = self.connected()
        reader = Call(server.receive)
        time.sleep(0.2)
        self.assertFalse(reader.done())
        self.assertFalse(server.cleanup())
        self.assertFalse(server.wait_cleaned(0.1))
        s_sock.shutdown(socket.SHUT_RDWR)
        self.assertFailsAt("receive", reader)
        self.assertTrue(server.wait_cleaned(TIMEOUT))
        self.assertIsNone(server.cleanup_error)

    def test_failed_handshake_garbage(self):
        """
        A peer that answers the ClientHello with garbage fails the handshake.
        """
        client = self.session(library_under_test(), cfg())
        peer, mine = self.socketpair()
        call = Call(client.negotiate, mine)
        peer.settimeout(TIMEOUT)
        self.assertEqual(peer.recv(1)[:1], b"\x16")  # a TLS handshake record
        peer.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n" * 10)
        self.assertFailsAt("negotiate", call, ratstls.ERR_HANDSHAKE)

    def test_failed_handshake_server_gets_garbage(self):
        server = self.session(library_under_test(), cfg(server=True))
        peer, mine = self.socketpair()
        call = Call(server.negotiate, mine)
        peer.sendall(b"GET / HTTP/1.0\r\n\r\n")
        self.assertFailsAt("negotiate", call, ratstls.ERR_HANDSHAKE)

    def test_failed_handshake_peer_closes(self):
        server = self.session(library_under_test(), cfg(server=True))
        mine, peer = self.tcp_pair()
        call = Call(server.negotiate, mine)
        peer.close()
        self.sockets.remove(peer)
        e = self.assertFailsAt("negotiate", call, ratstls.ERR_HANDSHAKE)
        self.assertIn("0x907fffff", str(e))

    def test_negotiate_nonblocking_fd(self):
        client = self.session(library_under_test(), cfg())
        mine, _ = self.socketpair()
        mine.setblocking(False)
        started = time.monotonic()
        e = self.assertFailsAt("negotiate", Call(client.negotiate, mine), ratstls.ERR_HANDSHAKE)
        self.assertLess(time.monotonic() - started, 2)
        self.assertIn("non-blocking", str(e))

    def test_init_failure(self):
        with self.assertRaises(RatsTlsError) as caught:
            ratstls.RatsTlsSession(library_under_test(), cfg(attester="sgx_ecdsa"))
        self.assertEqual((caught.exception.step, caught.exception.code), ("init", -2))
        self.assertIn("init", str(caught.exception))

    def test_verification_callback_rejects(self):
        s_sock, c_sock = self.socketpair()
        server = self.session(library_under_test(), cfg(server=True))
        client = self.session(library_under_test(), cfg(), verify=lambda evidence: False)
        s_call = Call(server.negotiate, s_sock)
        self.assertFailsAt("negotiate", Call(client.negotiate, c_sock), ratstls.ERR_HANDSHAKE)
        self.assertFailsAt("negotiate", s_call, ratstls.ERR_HANDSHAKE)

    def test_verification_callback_raises(self):
        def verify(evidence):
            raise ValueError("no thanks")

        s_sock, c_sock = self.socketpair()
        server = self.session(library_under_test(), cfg(server=True, mutual=True), verify=verify)
        client = self.session(library_under_test(), cfg(mutual=True))
        c_call = Call(client.negotiate, c_sock)
        e = self.assertFailsAt("negotiate", Call(server.negotiate, s_sock))
        self.assertIn("no thanks", str(e))
        # TLS 1.3: the client may finish before the server rejects it.
        try:
            self.wait(c_call)
        except RatsTlsError:
            pass


class PlainTlsPeerTests(TestCase):
    """
    The mock speaks real TLS 1.3 and rejects peers without evidence.
    """

    def make_plain_certificate(self):
        """
        A self-signed ECDSA P-256 certificate without evidence, made with
        cryptography (a dependency of pyOpenSSL, which ENT requires).
        """
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "plain")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256())
        )
        directory = tempfile.mkdtemp(dir=tmpRoot())
        key_path = os.path.join(directory, "key.pem")
        cert_path = os.path.join(directory, "cert.pem")
        with open(key_path, "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )
        with open(cert_path, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        return key_path, cert_path

    def test_peer_without_evidence_rejected(self):
        """
        A plain TLS server (no evidence in its certificate) is rejected by
        the mock and the v2025 library.  The v2022 library (ed65) accepts
        it with the nullverifier, as measured: the test pins that, so that
        a change either way is noticed.
        """
        key, cert = self.make_plain_certificate()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        theirs, mine = self.socketpair()
        client = self.session(library_under_test(), cfg())

        def plain_server():
            with context.wrap_socket(theirs, server_side=True, do_handshake_on_connect=False) as s:
                s.settimeout(TIMEOUT)
                try:
                    s.do_handshake()
                except (ssl.SSLError, OSError):
                    pass

        server = Call(plain_server)
        if REAL_LIBRARY and library_under_test().layout == ratstls.LAYOUT_V2022:
            self.wait(Call(client.negotiate, mine))
        else:
            self.assertFailsAt("negotiate", Call(client.negotiate, mine), ratstls.ERR_HANDSHAKE)
        self.wait(server)

    @skipIf(MOCK_ONLY)
    def test_plain_tls_client(self):
        """
        Mock-only: checks the mock's evidence format in the certificate.
        A non-mutual rats-tls server is a TLS 1.3 server whose certificate
        carries the evidence.
        """
        theirs, mine = self.socketpair()
        server = self.session(library_under_test(), cfg(server=True))
        negotiated = Call(server.negotiate, mine)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        theirs.settimeout(TIMEOUT)
        plain = context.wrap_socket(theirs)
        self.wait(negotiated)
        self.assertEqual(plain.version(), "TLSv1.3")
        self.assertIn(b"null-evidence:nullattester:", plain.getpeercert(binary_form=True))
        plain.sendall(b"hello")
        self.assertEqual(self.wait(Call(server.receive)), b"hello")
        server.transmit(b"hi")
        self.assertEqual(plain.recv(10), b"hi")

    def test_mutual_server_rejects_client_without_certificate(self):
        theirs, mine = self.socketpair()
        server = self.session(library_under_test(), cfg(server=True, mutual=True))
        negotiated = Call(server.negotiate, mine)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        theirs.settimeout(TIMEOUT)
        try:
            plain = context.wrap_socket(theirs)
            plain.recv(1)
        except (ssl.SSLError, OSError):
            pass
        self.assertFailsAt("negotiate", negotiated, ratstls.ERR_HANDSHAKE)


class MockLibraryTests(TestCase):
    """
    The mock's own C-level promises, through the raw cffi functions.

    Mock-only: the real library makes none of them.
    """

    skip = MOCK_ONLY

    def raw_pair(self):
        """
        A negotiated server session and a raw client handle.
        """
        library = mock_library()
        s_sock, c_sock = self.socketpair()
        server = self.session(library, cfg(server=True))
        handle_ptr = ffi.new("rats_tls_handle *")
        self.assertEqual(library.lib.rats_tls_init(library.make_conf(cfg()), handle_ptr), 0)
        s_call = Call(server.negotiate, s_sock)
        c_call = Call(library.lib.rats_tls_negotiate, handle_ptr[0], c_sock.fileno())
        self.assertEqual(self.wait(c_call), 0)
        self.wait(s_call)
        return library.lib, handle_ptr[0], server

    def test_receive_keeps_size_on_close(self):
        lib, handle, server = self.raw_pair()
        server.cleanup()
        buf = ffi.new("char[]", 100)
        size = ffi.new("size_t *", 1234)
        self.assertEqual(lib.rats_tls_receive(handle, buf, size), ratstls.ERR_INVALID)
        self.assertEqual(size[0], 1234)
        self.assertEqual(lib.rats_tls_cleanup(handle), 0)

    def test_cleanup_releases_blocked_receive(self):
        lib, handle, _ = self.raw_pair()
        buf = ffi.new("char[]", 100)
        size = ffi.new("size_t *", 100)
        reader = Call(lib.rats_tls_receive, handle, buf, size)
        time.sleep(0.2)
        self.assertFalse(reader.done())
        self.assertEqual(lib.rats_tls_cleanup(handle), 0)
        self.assertEqual(self.wait(reader, timeout=2), ratstls.ERR_INVALID)

    def test_cleanup_releases_blocked_transmit(self):
        """
        A transmit stuck on a full socket (the peer does not read) is released
        by cleanup, and meanwhile receive still works on the same handle.
        """
        lib, handle, server = self.raw_pair()
        data = ffi.new("char[]", 16 * 1024 * 1024)
        size = ffi.new("size_t *", len(data))
        writer = Call(lib.rats_tls_transmit, handle, data, size)
        time.sleep(0.3)
        self.assertFalse(writer.done())
        server.transmit(b"while you write")
        buf = ffi.new("char[]", 100)
        rsize = ffi.new("size_t *", 100)
        self.assertEqual(self.wait(Call(lib.rats_tls_receive, handle, buf, rsize)), 0)
        self.assertEqual(ffi.buffer(buf, rsize[0])[:], b"while you write")
        self.assertEqual(lib.rats_tls_cleanup(handle), 0)
        self.assertEqual(self.wait(writer, timeout=2), ratstls.ERR_INVALID)
