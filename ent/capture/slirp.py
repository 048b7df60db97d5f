"""
libslirp 4.7 through cffi in ABI mode: the user-space TCP/IP stack of QEMU
user networking and slirp4netns, for an agent with no TUN and no root.

ABI mode needs no compiler at install time, but the structs must be declared
with their full layout (IPv6 fields included): L{load} checks the sizes and
offsets measured against the real library before anything is called.
"""

import ipaddress

from cffi import FFI

from ent.errors import UserStackError

CDEF = """
struct in_addr { uint32_t s_addr; };
struct in6_addr { uint32_t s6_addr32[4]; };
struct sockaddr { unsigned short sa_family; char sa_data[14]; };
struct sockaddr_in;
struct sockaddr_in6;
typedef struct Slirp Slirp;
enum {
    SLIRP_POLL_IN = 1,
    SLIRP_POLL_OUT = 2,
    SLIRP_POLL_PRI = 4,
    SLIRP_POLL_ERR = 8,
    SLIRP_POLL_HUP = 16,
};
typedef ssize_t (*SlirpWriteCb)(const void *buf, size_t len, void *opaque);
typedef void (*SlirpTimerCb)(void *opaque);
typedef int (*SlirpAddPollCb)(int fd, int events, void *opaque);
typedef int (*SlirpGetREventsCb)(int idx, void *opaque);
typedef enum SlirpTimerId { SLIRP_TIMER_RA, SLIRP_TIMER_NUM } SlirpTimerId;
typedef struct SlirpCb {
    SlirpWriteCb send_packet;
    void (*guest_error)(const char *msg, void *opaque);
    int64_t (*clock_get_ns)(void *opaque);
    void *(*timer_new)(SlirpTimerCb cb, void *cb_opaque, void *opaque);
    void (*timer_free)(void *timer, void *opaque);
    void (*timer_mod)(void *timer, int64_t expire_time, void *opaque);
    void (*register_poll_fd)(int fd, void *opaque);
    void (*unregister_poll_fd)(int fd, void *opaque);
    void (*notify)(void *opaque);
    void (*init_completed)(Slirp *slirp, void *opaque);
    void *(*timer_new_opaque)(SlirpTimerId id, void *cb_opaque, void *opaque);
} SlirpCb;
typedef struct SlirpConfig {
    uint32_t version;
    int restricted;
    bool in_enabled;
    struct in_addr vnetwork;
    struct in_addr vnetmask;
    struct in_addr vhost;
    bool in6_enabled;
    struct in6_addr vprefix_addr6;
    uint8_t vprefix_len;
    struct in6_addr vhost6;
    const char *vhostname;
    const char *tftp_server_name;
    const char *tftp_path;
    const char *bootfile;
    struct in_addr vdhcp_start;
    struct in_addr vnameserver;
    struct in6_addr vnameserver6;
    const char **vdnssearch;
    const char *vdomainname;
    size_t if_mtu;
    size_t if_mru;
    bool disable_host_loopback;
    bool enable_emu;
    struct sockaddr_in *outbound_addr;
    struct sockaddr_in6 *outbound_addr6;
    bool disable_dns;
    bool disable_dhcp;
} SlirpConfig;
Slirp *slirp_new(const SlirpConfig *cfg, const SlirpCb *callbacks, void *opaque);
void slirp_cleanup(Slirp *slirp);
void slirp_pollfds_fill(Slirp *slirp, uint32_t *timeout, SlirpAddPollCb add_poll, void *opaque);
void slirp_pollfds_poll(Slirp *slirp, int select_error, SlirpGetREventsCb get_revents, void *opaque);
void slirp_input(Slirp *slirp, const uint8_t *pkt, int pkt_len);
int slirp_add_hostfwd(Slirp *slirp, int is_udp, struct in_addr host_addr, int host_port,
                      struct in_addr guest_addr, int guest_port);
int slirp_add_unix(Slirp *slirp, const char *unixsock, struct in_addr *guest_addr, int guest_port);
char *slirp_connection_info(Slirp *slirp);
const char *slirp_version_string(void);
void free(void *);
"""

LIBRARY = "libslirp.so.0"
# The layout measured against libslirp 4.7 (ABI mode lays structs out itself).
LAYOUT = {"SlirpConfig": 184, "SlirpCb": 88}
OFFSETS = {"if_mtu": 136, "disable_dns": 176}
# The largest if_mtu slirp_new accepts.
MAX_MTU = 65521

_loaded = None


def load(name=LIBRARY):
    """
    The cffi FFI and library; a missing or unexpected libslirp is a
    L{UserStackError} that says what to install.
    """
    global _loaded
    if _loaded is not None and name == LIBRARY:
        return _loaded
    ffi = FFI()
    ffi.cdef(CDEF)
    try:
        lib = ffi.dlopen(name)
        libc = ffi.dlopen(None)
    except OSError as e:
        raise UserStackError(f"--stack user needs libslirp ({name}): {e}; install it with 'apt-get install libslirp0'")
    for struct, size in LAYOUT.items():
        if ffi.sizeof(struct) != size:
            raise UserStackError(f"{struct} is {ffi.sizeof(struct)} bytes here, not the {size} of libslirp 4.x")
    for field, offset in OFFSETS.items():
        if ffi.offsetof("SlirpConfig", field) != offset:
            raise UserStackError(f"SlirpConfig.{field} is not at offset {offset}: unexpected layout")
    version = ffi.string(lib.slirp_version_string()).decode()
    if not version.startswith("4."):
        raise UserStackError(f"libslirp {version} is not a 4.x release, which ENT supports")
    result = (ffi, lib, libc, version)
    if name == LIBRARY:
        _loaded = result
    return result


def inAddr(ffi, address):
    """
    A C{struct in_addr} (network byte order) for C{address}.
    """
    value = ffi.new("struct in_addr *")
    value.s_addr = int.from_bytes(ipaddress.IPv4Address(address).packed, "little")
    return value
