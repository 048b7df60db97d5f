"""
A cffi binding (ABI mode: nothing to compile at install) to librats_tls.so.

It offers one L{RatsTlsSession} per connection: a blocking handshake, then
receive and transmit on the blocking fd or, once it is made non-blocking,
calls that return at once when the socket is not ready.  Every call into
the library releases the GIL, and no session is ever entered by two threads
at once (OpenSSL's SSL objects are not thread-safe).  The Twisted transport
built on it lives elsewhere.

Two struct layouts of C{rats_tls_conf_t} exist in the wild (see
shared/RATS-TLS.md); L{load} tells them apart by the symbols the library
exports.  It also checks the plugin directories before loading the library,
because the library's load-time constructor calls C{exit(1)} without them.
"""

import errno
import fcntl
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from cffi import FFI

from ent.errors import ConfigurationError, RatsTlsClosed, RatsTlsError, RatsTlsLibraryError
from ent.legs.evidence import EVIDENCE_TYPES, SGX_FLAGS_DEBUG, Evidence
from ent.legs.ratsplugins import (
    DEFAULT_LIBRARY,
    LIBRARY_ENV,
    PLUGIN_DIR_ENV,
    PLUGIN_KINDS,
    UPSTREAM_PLUGIN_DIR,
    default_library_path,
    find_plugin_dir,
    missingHelp,
)

# The library's location and plugin checks live in ent.legs.ratsplugins;
# their names are part of this module's interface too.
__all__ = [
    "DEFAULT_LIBRARY",
    "LAYOUT_V2022",
    "LAYOUT_V2025",
    "LIBRARY_ENV",
    "PLUGIN_DIR_ENV",
    "PLUGIN_KINDS",
    "UPSTREAM_PLUGIN_DIR",
    "RatsTlsConfig",
    "RatsTlsLibrary",
    "RatsTlsSession",
    "default_library_path",
    "ffi",
    "find_plugin_dir",
    "load",
]

LOG_LEVEL_ENV = "RATS_TLS_GLOBAL_LOG_LEVEL"

LAYOUT_V2022 = "v2022"
LAYOUT_V2025 = "v2025"

API_VERSION = 1
FLAG_MUTUAL = 1 << 0
FLAG_SERVER = 1 << 1

LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR, LOG_FATAL, LOG_NONE = range(6)
_LOG_LEVEL_NAMES = {
    "debug": LOG_DEBUG,
    "info": LOG_INFO,
    "warn": LOG_WARN,
    "error": LOG_ERROR,
    "fatal": LOG_FATAL,
    "off": LOG_NONE,
}

CERT_ALGO_RSA_3072_SHA256 = 0
CERT_ALGO_ECC_256_SHA256 = 1

#: Error codes as signed 32-bit values.
ERR_UNKNOWN = -1
ERR_INVALID = -2
ERR_NO_MEM = -3
ERR_HANDSHAKE = 0x907FFFFF - (1 << 32)

_NAME_SIZE = 32

_CDEF = """
typedef struct rtls_core_context_t *rats_tls_handle;
typedef int (*rats_tls_callback_t)(void *);

typedef struct {
    char *name;
    uint8_t *value;
    size_t value_size;
} claim_t;

typedef struct {
    _Bool valid;
    uint8_t spid[16];
    _Bool linkable;
} rats_tls_quote_sgx_epid_t;

typedef struct {
    _Bool valid;
    uint8_t cert_type;
} rats_tls_quote_sgx_ecdsa_t;

typedef struct {
    unsigned int api_version;
    unsigned long flags;
    int log_level;
    char tls_type[32];
    char attester_type[32];
    char verifier_type[32];
    char crypto_type[32];
    int cert_algo;
    unsigned long long enclave_id;
    rats_tls_quote_sgx_epid_t quote_sgx_epid;
    rats_tls_quote_sgx_ecdsa_t quote_sgx_ecdsa;
} rats_tls_conf_v2022_t;

typedef struct {
    unsigned int api_version;
    unsigned long flags;
    int log_level;
    char tls_type[32];
    char attester_type[32];
    char verifier_type[32];
    char crypto_type[32];
    int cert_algo;
    claim_t *custom_claims;
    size_t custom_claims_length;
    rats_tls_quote_sgx_epid_t quote_sgx_epid;
    rats_tls_quote_sgx_ecdsa_t quote_sgx_ecdsa;
} rats_tls_conf_v2025_t;

/* What the verification callback gets (rtls_evidence_t of api.h); the
   2025 layout adds the custom claims after type, and a csv union member. */
typedef struct {
    void *public_key;
    int user_data_size;
    char *user_data;
    int unhashed_size;
    char *unhashed;
} ehd_t;

typedef struct {
    uint8_t *mr_enclave;
    uint8_t *mr_signer;
    uint32_t product_id;
    uint32_t security_version;
    uint8_t *attributes;
    size_t collateral_size;
    char *collateral;
} rtls_sgx_evidence_t;

typedef struct {
    uint8_t *mrseam;
    uint8_t *mrseamsigner;
    uint8_t *tcb_svns;
    uint8_t *cpu_svn;
    uint8_t *mrtd;
    uint8_t *rtmr;
    uint8_t *tdel_info;
    uint32_t tdel_info_sz;
    uint8_t *tdel_data;
    uint32_t tdel_data_sz;
} rtls_tdx_evidence_t;

typedef struct {
    uint8_t *vm_id;
    uint32_t vm_id_sz;
    uint8_t *vm_version;
    uint32_t vm_version_sz;
    uint8_t *measure;
    uint32_t measure_sz;
    uint8_t *policy;
    uint32_t policy_sz;
} rtls_csv_evidence_t;

typedef struct {
    int type;
    ehd_t ehd;
    int quote_size;
    char *quote;
    union {
        rtls_sgx_evidence_t sgx;
        rtls_tdx_evidence_t tdx;
    };
} rtls_evidence_v2022_t;

typedef struct {
    int type;
    claim_t *custom_claims;
    size_t custom_claims_length;
    ehd_t ehd;
    int quote_size;
    char *quote;
    union {
        rtls_sgx_evidence_t sgx;
        rtls_tdx_evidence_t tdx;
        rtls_csv_evidence_t csv;
    };
} rtls_evidence_v2025_t;

/* The conf pointer's type depends on the layout: see CONF_TYPES. */
int rats_tls_init(const void *conf, rats_tls_handle *handle);
int rats_tls_set_verification_callback(rats_tls_handle *handle, rats_tls_callback_t cb);
int rats_tls_negotiate(rats_tls_handle handle, int fd);
int rats_tls_receive(rats_tls_handle handle, void *buf, size_t *buf_size);
int rats_tls_transmit(rats_tls_handle handle, void *buf, size_t *buf_size);
int rats_tls_cleanup(rats_tls_handle handle);

/* Only looked up, never called: they tell the layouts apart. */
claim_t *clone_claims_list(claim_t *claims, size_t claims_length);
void free_claims_list(claim_t *claims, size_t claims_length);
int rtls_loglevel_getenv(const char *name);
"""

#: One FFI for both layouts; the error enums are read as C{int}, i.e. signed.
ffi = FFI()
ffi.cdef(_CDEF)

CONF_TYPES = {LAYOUT_V2022: "rats_tls_conf_v2022_t", LAYOUT_V2025: "rats_tls_conf_v2025_t"}
EVIDENCE_CTYPES = {LAYOUT_V2022: "rtls_evidence_v2022_t *", LAYOUT_V2025: "rtls_evidence_v2025_t *"}

#: rtls_evidence_t.type of SGX ECDSA evidence, the only type whose union
#: the libraries fill (and the only one v2022 sets at all).
EVIDENCE_SGX_ECDSA = 1
_SGX_MEASUREMENT_SIZE = 32
_SGX_ATTRIBUTES_SIZE = 16
# sgx_quote3_t (sgx_quote_3.h): a 48-byte header, then the report body with
# attributes at 48, mr_enclave at 64, mr_signer at 128; sizeof is 436.
_SGX_QUOTE3_SIZE = 436
_SGX_ATTRIBUTES_AT = 48 + 48
_SGX_MRENCLAVE_AT = 48 + 64
_SGX_MRSIGNER_AT = 48 + 128

#: Bounds of the custom claims a conf may carry (ours, to keep certificates
#: small) ...
MAX_CONF_CLAIMS = 32
MAX_CONF_CLAIM_NAME = 64
MAX_CONF_CLAIM_VALUE = 1024
#: ... and of what a peer's evidence may bring before it is rejected.
MAX_PEER_CLAIMS = 64
MAX_PEER_CLAIM_NAME = 255
MAX_PEER_CLAIM_VALUE = 4096

_DETAILS = {
    ERR_UNKNOWN: "unknown error",
    ERR_INVALID: "invalid argument or state (RATS_TLS_ERR_INVALID)",
    ERR_NO_MEM: "out of memory",
    -4: "plugin not registered",
    -5: "cannot load the crypto wrappers",
    -6: "cannot load the tls wrappers",
    -7: "cannot load the enclave quote plugins",
    -8: "dlopen of a plugin failed",
    -9: "initialisation failed",
    -10: "unsupported certificate algorithm",
    ERR_HANDSHAKE: (
        "TLS handshake failed (the peer closed, spoke something other than rats-tls, or its evidence was rejected)"
    ),
}


def _detail(code):
    return _DETAILS.get(code, "")


#: What L{RatsTlsSession.send} takes at once: four full TLS records.
SEND_CHUNK = 65536


def _wouldBlock(rc):
    """
    Whether a failed receive or transmit only met a socket that was not
    ready.  rats-tls maps OpenSSL's WANT_READ/WANT_WRITE to -2 like a
    close, but the socket call under it left C{EAGAIN} in C{errno}, which
    cffi saved right after the call (a close leaves 0, EPIPE or
    ECONNRESET).
    """
    return rc == ERR_INVALID and ffi.errno in (errno.EAGAIN, errno.EWOULDBLOCK)


def _has_symbol(lib, name):
    try:
        getattr(lib, name)
    except AttributeError:
        return False
    return True


def load(path=None, plugin_dir=None, layout=None):
    """
    Load librats_tls.so after checking that loading it cannot kill us.

    @param path: the library; by default L{default_library_path}.
    @param plugin_dir: see L{find_plugin_dir}.
    @param layout: L{LAYOUT_V2022} or L{LAYOUT_V2025} to skip detection.
    @rtype: L{RatsTlsLibrary}
    @raise RatsTlsLibraryError: if the library or its plugins are missing or
        unusable.
    """
    path = os.path.abspath(path or default_library_path())
    if not os.path.isfile(path):
        raise RatsTlsLibraryError(f"librats_tls not found at {path}: " + missingHelp(path))
    found_plugins = find_plugin_dir(path, plugin_dir)
    try:
        lib = ffi.dlopen(path)
    except OSError as e:
        raise RatsTlsLibraryError(f"cannot load {path} ({e}): " + missingHelp(path)) from None
    v2025 = _has_symbol(lib, "clone_claims_list") and _has_symbol(lib, "free_claims_list")
    v2022 = _has_symbol(lib, "rtls_loglevel_getenv")
    if layout is None:
        if v2025 and not v2022:
            layout = LAYOUT_V2025
        elif v2022 and not v2025:
            layout = LAYOUT_V2022
        else:
            raise RatsTlsLibraryError(
                f"cannot tell which rats-tls version {path} is (it exports"
                f" {'both' if v2022 else 'neither'} clone_claims_list and"
                " rtls_loglevel_getenv)"
            )
    elif layout not in CONF_TYPES:
        raise ValueError(f"unknown rats-tls layout {layout!r}")
    for name in (
        "rats_tls_init",
        "rats_tls_set_verification_callback",
        "rats_tls_negotiate",
        "rats_tls_receive",
        "rats_tls_transmit",
        "rats_tls_cleanup",
    ):
        if not _has_symbol(lib, name):
            raise RatsTlsLibraryError(f"{path} does not export {name}: is it librats_tls?")
    return RatsTlsLibrary(path, layout, found_plugins, lib)


def _default_log_level():
    return _LOG_LEVEL_NAMES.get(os.environ.get(LOG_LEVEL_ENV, "").strip().lower(), LOG_ERROR)


@dataclass
class RatsTlsConfig:
    """
    What one rats-tls handle is asked to be.

    Without SGX both sides use the null plugins, the defaults here.
    C{log_level} C{None} follows C{$RATS_TLS_GLOBAL_LOG_LEVEL} (default
    error).  C{cert_algo} is always set explicitly because the library's
    "default" constant differs between versions.
    """

    attester: str = "nullattester"
    verifier: str = "nullverifier"
    tls_type: str = "openssl"
    crypto_type: str = "openssl"
    mutual: bool = False
    server: bool = False
    log_level: int | None = None
    cert_algo: int = CERT_ALGO_ECC_256_SHA256
    #: rats-tls custom claims, C{(name: str, value: bytes)} pairs, that the
    #: attester binds into its evidence (2025 library only).
    claims: tuple = ()

    @property
    def flags(self):
        return (FLAG_MUTUAL if self.mutual else 0) | (FLAG_SERVER if self.server else 0)


class RatsTlsLibrary:
    """
    A loaded librats_tls.so and the conf layout it expects.

    @ivar lib: the raw cffi library, for tests and the curious.
    """

    def __init__(self, path, layout, plugin_dir, lib):
        self.path = path
        self.layout = layout
        self.plugin_dir = plugin_dir
        self.lib = lib
        self.conf_type = CONF_TYPES[layout]

    def __repr__(self):
        return f"<RatsTlsLibrary {self.path} ({self.layout})>"

    def make_conf(self, config):
        """
        A C{rats_tls_conf_t} in this library's layout for C{config}.  The
        claims it points at live as long as the returned object (the library
        copies them in C{rats_tls_init}).
        """
        claims = _checkClaims(config.claims)
        if claims and self.layout != LAYOUT_V2025:
            raise ConfigurationError(
                f"custom claims (--claim) need the 2025 rats-tls library; {self.path} is the 2022 one"
            )
        conf = ffi.new(self.conf_type + " *")
        if claims:
            array = ffi.new("claim_t[]", len(claims))
            keep = [array]
            for i, (name, value) in enumerate(claims):
                cname = ffi.new("char[]", name)
                cvalue = ffi.new("uint8_t[]", value or b"\0")
                keep += [cname, cvalue]
                array[i].name = cname
                array[i].value = cvalue
                array[i].value_size = len(value)
            conf.custom_claims = array
            conf.custom_claims_length = len(claims)
            _conf_keepalive[conf] = keep
        conf.api_version = API_VERSION
        conf.flags = config.flags
        log_level = _default_log_level() if config.log_level is None else config.log_level
        conf.log_level = int(log_level)
        conf.cert_algo = int(config.cert_algo)
        for field, value in (
            ("tls_type", config.tls_type),
            ("attester_type", config.attester),
            ("verifier_type", config.verifier),
            ("crypto_type", config.crypto_type),
        ):
            try:
                raw = (value or "").encode("ascii")
            except UnicodeEncodeError:
                raise ConfigurationError(f"rats-tls {field} {value!r} is not ASCII") from None
            if len(raw) >= _NAME_SIZE or b"\0" in raw:
                raise ConfigurationError(f"rats-tls {field} {value!r} is too long (at most {_NAME_SIZE - 1} bytes)")
            setattr(conf, field, raw)
        return conf

    def session(self, config, verify=None):
        """
        A new L{RatsTlsSession}; see there.
        """
        return RatsTlsSession(self, config, verify)

    def parse_evidence(self, pointer):
        """
        The L{Evidence} behind the C{rtls_evidence_t *} that this library
        passes to a verification callback.  Pure parsing: it runs in the
        handshake thread.

        @raise ValueError: if the evidence is malformed or over our bounds
            (the handshake is then rejected).
        """
        if pointer == ffi.NULL:
            raise ValueError("the library passed no evidence")
        ev = ffi.cast(EVIDENCE_CTYPES[self.layout], pointer)
        if self.layout == LAYOUT_V2022:
            # v2022 leaves the struct uninitialised unless it is SGX ECDSA:
            # a stray 1 in garbage must not be read as measurements.
            kind = "sgx_ecdsa" if ev.type == EVIDENCE_SGX_ECDSA and _sgxPointsIntoQuote(ev) else "none"
            claims = ()
        else:
            kind = EVIDENCE_TYPES.get(ev.type, "none")
            claims = _peerClaims(ev.custom_claims, ev.custom_claims_length)
        if kind != "sgx_ecdsa":
            return Evidence(kind=kind, claims=claims)
        if not _sgxPointsIntoQuote(ev):
            raise ValueError("SGX ECDSA evidence whose fields do not point into its quote")
        sgx = ev.sgx
        flags = int.from_bytes(ffi.buffer(sgx.attributes, _SGX_ATTRIBUTES_SIZE)[:8], "little")
        return Evidence(
            kind=kind,
            mrenclave=ffi.buffer(sgx.mr_enclave, _SGX_MEASUREMENT_SIZE)[:],
            mrsigner=ffi.buffer(sgx.mr_signer, _SGX_MEASUREMENT_SIZE)[:],
            isvprodid=int(sgx.product_id),
            isvsvn=int(sgx.security_version),
            debug=bool(flags & SGX_FLAGS_DEBUG),
            claims=claims,
        )


def _sgxPointsIntoQuote(ev):
    """
    Whether C{ev}'s SGX fields point where both libraries set them: into the
    report body of the C{sgx_quote3_t} at C{ev.quote}, of C{quote_size}
    436.  Only compares addresses: safe on garbage.
    """
    if ev.quote == ffi.NULL or ev.quote_size != _SGX_QUOTE3_SIZE:
        return False
    base = int(ffi.cast("uintptr_t", ev.quote))
    sgx = ev.sgx
    return all(
        int(ffi.cast("uintptr_t", pointer)) == base + offset
        for pointer, offset in (
            (sgx.mr_enclave, _SGX_MRENCLAVE_AT),
            (sgx.mr_signer, _SGX_MRSIGNER_AT),
            (sgx.attributes, _SGX_ATTRIBUTES_AT),
        )
    )


#: conf -> the claim buffers it points at (see L{RatsTlsLibrary.make_conf}).
_conf_keepalive = weakref.WeakKeyDictionary()


def _checkClaims(claims):
    """
    C{claims} as C{(name bytes, value bytes)} pairs, within our bounds.

    @raise ConfigurationError: if they are not.
    """
    claims = tuple(claims or ())
    if len(claims) > MAX_CONF_CLAIMS:
        raise ConfigurationError(f"at most {MAX_CONF_CLAIMS} rats-tls custom claims, not {len(claims)}")
    checked = []
    for claim in claims:
        try:
            name, value = claim
        except (TypeError, ValueError):
            raise ConfigurationError(f"a rats-tls custom claim is a (name, value) pair, not {claim!r}") from None
        if not isinstance(name, str):
            raise ConfigurationError(f"rats-tls claim name {name!r} is not a string")
        try:
            raw = name.encode("ascii")
        except UnicodeEncodeError:
            raise ConfigurationError(f"rats-tls claim name {name!r} is not ASCII") from None
        if not raw or len(raw) > MAX_CONF_CLAIM_NAME or b"\0" in raw:
            raise ConfigurationError(
                f"rats-tls claim name {name!r} must be 1 to {MAX_CONF_CLAIM_NAME} bytes without NUL"
            )
        if isinstance(value, str):
            raise ConfigurationError(f"rats-tls claim {name!r}: the value must be bytes, not str")
        try:
            value = bytes(value)
        except TypeError:
            raise ConfigurationError(f"rats-tls claim {name!r}: the value must be bytes, not {value!r}") from None
        if len(value) > MAX_CONF_CLAIM_VALUE:
            raise ConfigurationError(
                f"rats-tls claim {name!r}: the value is {len(value)} bytes (at most {MAX_CONF_CLAIM_VALUE})"
            )
        checked.append((raw, value))
    return checked


def _peerClaims(array, length):
    """
    The sorted C{(name, value)} pairs of a peer's C{claim_t} list.

    @raise ValueError: if it is malformed or over our bounds.
    """
    if length == 0:
        return ()
    if length > MAX_PEER_CLAIMS:
        raise ValueError(f"the peer sent {length} custom claims (at most {MAX_PEER_CLAIMS})")
    if array == ffi.NULL:
        raise ValueError(f"{length} custom claims at NULL")
    claims = []
    for i in range(length):
        claim = array[i]
        if claim.name == ffi.NULL:
            raise ValueError("a custom claim without a name")
        raw = ffi.string(claim.name, MAX_PEER_CLAIM_NAME + 1)
        if len(raw) > MAX_PEER_CLAIM_NAME:
            raise ValueError(f"a custom claim name is longer than {MAX_PEER_CLAIM_NAME} bytes")
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"custom claim name {raw!r} is not UTF-8") from None
        size = claim.value_size
        if size > MAX_PEER_CLAIM_VALUE:
            raise ValueError(f"custom claim {name!r} is {size} bytes (at most {MAX_PEER_CLAIM_VALUE})")
        if size and claim.value == ffi.NULL:
            raise ValueError(f"custom claim {name!r}: {size} bytes at NULL")
        claims.append((name, ffi.buffer(claim.value, size)[:] if size else b""))
    return tuple(sorted(claims))


class RatsTlsSession:
    """
    One rats-tls handle, for one connection (a handle holds one session).

    The library sits on OpenSSL, whose SSL objects must never be used by two
    threads at once, so a session is entered by one thread at a time: a
    call made while another thread is inside the library with this session
    is refused with L{RatsTlsError} (step C{"concurrent"}) and counted in
    L{concurrent_entries}, instead of racing.  Drive a session from one
    thread, or serialise the calls yourself.

    All calls release the GIL.  On a blocking fd they block; once the
    handshake is over the fd may be made non-blocking, and then L{receive}
    returns C{None} and L{send} C{0} when the socket is not ready (the
    library reports that as error -2 with C{errno} C{EAGAIN}; the session
    stays usable).  L{cleanup} never frees the handle under a call still
    running in another thread (the real library would crash): it defers the
    C cleanup until that call returns.  To make a blocked L{receive} return,
    shut the socket down; close the fd only once L{wait_cleaned} says the
    handle is gone, so that the library cannot write into a reused fd.
    """

    #: How many calls were refused, process-wide, because another thread
    #: was inside the library with the same session (tests assert 0).
    concurrent_entries = 0
    _count_lock = threading.Lock()

    #: The peer's L{Evidence} as the last verification callback saw it, or
    #: C{None} while none has run (e.g. a server without C{mutual}).
    evidence = None

    def __init__(
        self, library: RatsTlsLibrary, config: RatsTlsConfig, verify: Callable[[Evidence], bool] | None = None
    ):
        """
        @param verify: called during the handshake, in the handshake thread,
            with the peer's L{Evidence} (already accepted by the library's
            verifier plugin); a false result or an exception rejects the
            peer.  Without it every evidence the plugin accepted is.
        """
        self._lib = library.lib
        self.library = library
        self.config = config
        self._state_lock = threading.Lock()
        self._cleaned = threading.Event()
        # The thread inside the library with this session, if any.
        self._inside = None
        self._closing = False
        self._rbuf = None
        self._rsize = ffi.new("size_t *")
        self._wsize = ffi.new("size_t *")
        # send(): the copy OpenSSL is part-way through, which a retry must
        # pass again at the same address and length.
        self._wbuf = None
        self._wpending = 0
        self._callback = None
        self._callback_error = None
        self.cleanup_error = None

        conf = library.make_conf(config)
        handle_ptr = ffi.new("rats_tls_handle *")
        rc = self._lib.rats_tls_init(conf, handle_ptr)
        if rc != 0:
            raise RatsTlsError("init", rc, _detail(rc))
        self._handle_ptr = handle_ptr
        self._handle = handle_ptr[0]
        self._set_verify(verify)

    def _set_verify(self, verify):
        # Always set: the callback is where the evidence is read.  It runs in
        # the handshake thread, so it only parses and calls verify.
        def call(pointer):
            self.evidence = evidence = self.library.parse_evidence(pointer)
            if verify is None:
                return 1
            return 1 if verify(evidence) else 0

        def onerror(exc_type, exc_value, tb):
            self._callback_error = exc_value

        # Referenced from self as long as the handle lives: the library keeps
        # only the raw function pointer.
        callback = ffi.callback("int(void *)", call, error=0, onerror=onerror)
        rc = self._lib.rats_tls_set_verification_callback(self._handle_ptr, callback)
        if rc != 0:
            self._lib.rats_tls_cleanup(self._handle)
            self._closing = True
            self._cleaned.set()
            raise RatsTlsError("set_verification_callback", rc, _detail(rc))
        self._callback = callback

    # Every call that uses the handle goes through _enter/_leave: one thread
    # at a time, and cleanup waits for it.

    def _enter(self, step):
        with self._state_lock:
            if self._closing:
                raise RatsTlsClosed(step, ERR_INVALID, "the session has been cleaned up")
            if self._inside is not None:
                inside = self._inside
                with RatsTlsSession._count_lock:
                    RatsTlsSession.concurrent_entries += 1
                raise RatsTlsError(
                    "concurrent",
                    ERR_INVALID,
                    f"{step} refused: thread {inside} is inside librats_tls with this session"
                    " (OpenSSL sessions are not thread-safe)",
                )
            self._inside = threading.get_ident()
            return self._handle

    def _leave(self):
        with self._state_lock:
            self._inside = None
            last = self._closing
        if last:
            self._free(deferred=True)

    def _free(self, deferred):
        rc = self._lib.rats_tls_cleanup(self._handle)
        self._handle = ffi.NULL
        self._callback = None
        self._cleaned.set()
        if rc != 0:
            error = RatsTlsError("cleanup", rc, _detail(rc))
            self.cleanup_error = error
            if not deferred:
                raise error

    @property
    def closed(self):
        """
        Whether L{cleanup} has been called.
        """
        return self._closing

    def negotiate(self, fd):
        """
        Run the handshake on C{fd}, a connected, blocking socket (or an object
        with C{fileno()}); blocks until it ends.
        """
        if hasattr(fd, "fileno"):
            fd = fd.fileno()
        handle = self._enter("negotiate")
        try:
            rc = self._lib.rats_tls_negotiate(handle, fd)
        finally:
            self._leave()
        if rc != 0:
            detail = _detail(rc)
            try:
                if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK:
                    detail = f"fd {fd} is non-blocking; rats-tls needs a blocking socket"
            except OSError as e:
                if e.errno == errno.EBADF:
                    detail = f"fd {fd} is not open"
            if self._callback_error is not None:
                detail += f"; the verification callback raised {self._callback_error!r}"
            raise RatsTlsError("negotiate", rc, detail)

    def receive(self, maxsize=16384):
        """
        Return what one TLS record brought (at most C{maxsize} bytes); never
        returns C{b""}.  On a blocking fd it waits for data; on a
        non-blocking one it returns C{None} when no whole record is there
        yet.

        @raise RatsTlsClosed: if the connection has ended, whichever way.
        """
        if maxsize <= 0:
            raise ValueError("maxsize must be positive")
        handle = self._enter("receive")
        try:
            # The buffers belong to whoever is inside: set them up only now.
            if self._rbuf is None or len(self._rbuf) < maxsize:
                self._rbuf = ffi.new("char[]", maxsize)
            size = self._rsize
            size[0] = maxsize
            ffi.errno = 0
            rc = self._lib.rats_tls_receive(handle, self._rbuf, size)
            if rc == 0:
                return ffi.buffer(self._rbuf, size[0])[:]
            if _wouldBlock(rc):
                return None
        finally:
            self._leave()
        raise RatsTlsClosed("receive", rc, "the connection has ended")

    def transmit(self, data):
        """
        Send all of C{data} (bytes-like) on a blocking fd; blocks until the
        library took it.

        @raise RatsTlsClosed: if the connection has ended.
        """
        view = ffi.from_buffer(data)
        total = len(view)
        if total == 0:
            return
        handle = self._enter("transmit")
        try:
            size = self._wsize
            done = 0
            while done < total:
                size[0] = total - done
                rc = self._lib.rats_tls_transmit(handle, view + done, size)
                if rc != 0:
                    raise RatsTlsClosed("transmit", rc, "the connection has ended")
                if size[0] == 0:
                    raise RatsTlsClosed("transmit", ERR_UNKNOWN, "the library sent nothing")
                done += size[0]
        finally:
            self._leave()

    def send(self, data, limit=SEND_CHUNK):
        """
        Non-blocking fd: encrypt and send the first C{limit} bytes of C{data},
        whole or not yet.

        OpenSSL (without partial writes, as rats-tls sets it up) takes a
        write the socket cannot hold in full part-way and wants it retried
        with the same buffer and length; the session keeps that copy.  So
        after a C{0} the next call must pass data that starts with the same
        bytes (nothing may be dropped from its front).

        @return: how many bytes of C{data} were sent: C{min(len(data),
            limit)}, or 0 if the socket is full.
        @raise RatsTlsClosed: if the connection has ended.
        """
        handle = self._enter("transmit")
        try:
            if self._wpending:
                length = self._wpending
                if len(data) < length:
                    raise ValueError(f"send retried with {len(data)} bytes; {length} are part-way out")
            else:
                length = min(len(data), limit)
                if length == 0:
                    return 0
                if self._wbuf is None or len(self._wbuf) < length:
                    self._wbuf = ffi.new("char[]", max(length, limit))
                ffi.memmove(self._wbuf, data, length)
            size = self._wsize
            size[0] = length
            ffi.errno = 0
            rc = self._lib.rats_tls_transmit(handle, self._wbuf, size)
            if rc == 0:
                self._wpending = 0
                return length
            if _wouldBlock(rc):
                self._wpending = length
                return 0
        finally:
            self._leave()
        raise RatsTlsClosed("transmit", rc, "the connection has ended")

    def cleanup(self):
        """
        Send close_notify and free the handle; the fd stays open.  Idempotent.

        @return: C{True} if the handle is freed now, C{False} if another
            thread's call is still running and will free it when it returns.
        """
        with self._state_lock:
            if self._closing:
                return self._cleaned.is_set()
            self._closing = True
            now = self._inside is None
        if now:
            self._free(deferred=False)
        return now

    def wait_cleaned(self, timeout=None):
        """
        Wait until the handle is freed (after L{cleanup}); C{True} if it is.
        """
        return self._cleaned.wait(timeout)
