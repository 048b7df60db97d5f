"""
Command-line options of C{twistd enta} and C{twistd entg}, and those that
every ENT service shares.

Every check that needs no privilege and no reactor happens here, so a bad
option is refused with a one-line reason before anything is configured.
ENG's flag names are accepted as they were.
"""

import ipaddress
import re
import sys
from typing import NamedTuple

from twisted.python import usage

from ent import versionLine
from ent.capture.mapping import Exposure, Mapping, checkUnique, parseExposure, parseListen, parseMapping
from ent.cli import parseNumber, parsePort, usageExit
from ent.errors import ConfigurationError
from ent.hostconfig.netfilter import tableName
from ent.legs.endpoints import checkClientDescription, checkServerDescription, hostOf, isPlainListen, portIn, tcpPortOf
from ent.legs.security import LegSecurity, RatsTlsChoice
from ent.legs.tls import TlsFiles
from ent.protocols.framing import MAX_PACKET
from ent.protocols.limits import DEFAULT_MAX_LEGS, DEFAULT_MAX_LEGS_PER_SOURCE

CLIENT_TUN_ADDRESS = "192.168.0.1"
SERVER_TUN_ADDRESS = "192.168.0.254"
TUN_PREFIX = 24
AGENT_PORT = 6980
GATEWAY_PORT = 6979
TUNNEL_PORT = 6978
# The tunnel's packets never travel as IP on a wire, so the largest MTU
# costs nothing and lets TCP inside the tunnel send 64 KB segments.
DEFAULT_MTU = 65535
MIN_MTU = 576
# The largest MTU libslirp takes (ent.capture.slirp.MAX_MTU).
MAX_USER_MTU = 65521


def _usage(function):
    """
    Turn a L{ConfigurationError} from C{function} into a L{usage.UsageError}.
    """

    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except ConfigurationError as e:
            raise usage.UsageError(str(e))

    wrapper.__doc__ = function.__doc__
    wrapper.__name__ = function.__name__
    return wrapper


def _helpText(method):
    """
    A flag's docstring as its --help text: twistd keeps a docstring's
    indentation inside the paragraph, so the lines are joined here.
    """
    method.__doc__ = " ".join(method.__doc__.split())
    return method


def _ports(text, what):
    """
    PORT[,PORT...], strictly: a space or an empty item is a typo to refuse,
    not something to read as fewer ports.
    """
    parts = text.split(",")
    if not all(part.isascii() and part.isdigit() for part in parts):
        raise ConfigurationError(f"{what} {text!r} is not PORT[,PORT...]: digits and commas, no spaces or empty items")
    return [portIn(text, part, what) for part in parts]


def _number(options, name):
    """
    The whole number that option C{name} gives.
    """
    return parseNumber(options[name], f"--{name}")


def _seconds(options, name):
    """
    The positive number of seconds that option C{name} gives (decimals allowed).
    """
    text = options[name]
    if isinstance(text, str) and re.fullmatch(r"[0-9]+(\.[0-9]+)?", text):
        value = float(text)
    elif isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        raise ConfigurationError(f"--{name} {text!r} is not a number of seconds")
    if value <= 0:
        raise ConfigurationError(f"--{name} {text!r} must be more than 0 seconds")
    return value


def _checkReadable(path, what):
    """
    Refuse a file that cannot be read now, rather than at the first connection.
    """
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ConfigurationError(f"{what} {path!r}: {e.strerror}")


# Linux's rule for interface names, and no "%", which asks for a numbered name.
_INTERFACE_NAME = re.compile(r"[^\s/:%]{1,15}")
_PLUGIN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,31}")
_CLAIM_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_CLAIMS = 32
MAX_CLAIM_VALUE = 1024
# Re-attest each rats-tls leg once an hour.
DEFAULT_REATTEST = 3600


LOG_FORMATS = ("text", "json")


class ObservabilityOptions(usage.Options):
    """
    How a service shows what it does: metrics and log format; shared by
    enta, entg and ent-relay.
    """

    command = "ent"

    optParameters = [
        [
            "metrics",
            None,
            None,
            "Serve Prometheus metrics at /metrics (and the legs at /legs) on this PORT (on 127.0.0.1), "
            "ADDR:PORT (e.g. 0.0.0.0:9100 for every interface) or server endpoint string.",
        ],
        [
            "log-format",
            None,
            "text",
            "text, or json: one JSON object per line with the event's fields (to where twistd writes its log).",
        ],
    ]

    def parseOptions(self, options=None):
        """
        Under twistd (our parent), refuse a bad command line in one line on
        stderr with exit status 2, before twistd prints its whole usage on
        stdout; without a parent (tests, other callers) raise as usual.
        """
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if getattr(self, "parent", None) is None:
                raise
            usageExit(f"twistd {self.command}", str(e))

    def parseArgs(self, *args):
        """
        No command takes positional arguments: name the stray one (twistd's
        own message is "Wrong number of arguments.").
        """
        if args:
            raise usage.UsageError(f"unexpected argument {args[0]!r}: every option is a --flag")

    def opt_version(self):
        """
        Print ENT's version and exit (ENG's -V).
        """
        print(versionLine(self.command))
        sys.exit(0)

    opt_V = opt_version

    def checkObservability(self):
        if self["metrics"] is not None:
            checkServerDescription(self["metrics"], "--metrics")
        if self["log-format"] not in LOG_FORMATS:
            raise ConfigurationError(f"--log-format {self['log-format']!r}: choose one of {', '.join(LOG_FORMATS)}")
        parent = getattr(self, "parent", None)
        if self["log-format"] == "json" and parent is not None and parent.get("syslog"):
            raise ConfigurationError("--log-format json writes to a file or stdout, not to --syslog")


class SecurityOptions(ObservabilityOptions):
    """
    How the legs of this process are protected; shared by enta and entg.
    """

    optParameters = [
        ["tls-cert", None, None, "TLS: this side's certificate (PEM)."],
        ["tls-key", None, None, "TLS: this side's private key (PEM)."],
        ["tls-ca", None, None, "TLS: the CA certificate that signs the peers (PEM)."],
        [
            "rats-tls-lib",
            None,
            None,
            "rats-tls: path of librats_tls.so (default: $ENT_RATS_TLS_LIB, "
            "else /usr/local/lib/rats-tls/librats_tls.so).",
        ],
        [
            "attester",
            None,
            None,
            "rats-tls: attester plugin (default as ENG: nullattester when connecting, sgx_ecdsa when accepting).",
        ],
        [
            "verifier",
            None,
            None,
            "rats-tls: verifier plugin (default as ENG: sgx_ecdsa when connecting, nullverifier when accepting).",
        ],
        ["tls-type", None, "openssl", "rats-tls: TLS wrapper plugin."],
        ["crypto-type", None, "openssl", "rats-tls: crypto wrapper plugin."],
        ["rats-tls-log-level", None, "error", "rats-tls: library log level (debug, info, warn, error, fatal, off)."],
        [
            "policy",
            None,
            None,
            "Who may join and what each may do: a TOML file of identities (docs/security.md); "
            "SIGHUP re-reads it. Without it, anyone who reaches a port may join, as in ENG.",
        ],
        [
            "reattest",
            None,
            str(DEFAULT_REATTEST),
            "rats-tls: re-handshake each leg when it reaches this age in seconds, spread out (0: never).",
        ],
        [
            "handshake-timeout",
            None,
            "10",
            "TLS and rats-tls: seconds a whole handshake may take, from accept or connect (more than 0).",
        ],
    ]
    optFlags = [["mutual", None, "rats-tls: both sides attest (the accepting side verifies the connecting one too)."]]

    def opt_claim(self, value):
        """
        rats-tls (2025 library): send the custom claim NAME=VALUE in this side's evidence when
        connecting; repeatable.
        """
        _usage(self._claim)(value)

    def _claim(self, value):
        name, sep, text = value.partition("=")
        if not sep or not _CLAIM_NAME.fullmatch(name):
            raise ConfigurationError(f"--claim {value!r}: give NAME=VALUE, NAME of letters, digits, '_', '.', '-'")
        claims = self.setdefault("claims", [])
        if any(n == name for n, _ in claims):
            raise ConfigurationError(f"--claim names {name} twice")
        raw = text.encode("utf-8")
        if len(raw) > MAX_CLAIM_VALUE:
            raise ConfigurationError(f"--claim {name}: the value is longer than {MAX_CLAIM_VALUE} bytes")
        if len(claims) >= MAX_CLAIMS:
            raise ConfigurationError(f"--claim: at most {MAX_CLAIMS} claims")
        claims.append((name, raw))

    def checkPolicy(self):
        """
        Load --policy now, so that a wrong key is refused with its file and
        line before anything starts; check --reattest, --claim and
        --handshake-timeout.
        """
        from ent.legs.policy import loadPolicy

        self.setdefault("claims", [])
        self["claims"] = tuple(self["claims"])
        self["reattest"] = _number(self, "reattest")
        self["handshake-timeout"] = _seconds(self, "handshake-timeout")
        if self["reattest"] < 0:
            raise ConfigurationError(f"--reattest {self['reattest']} is negative (0 turns re-attestation off)")
        self["policy-rules"] = None
        if self["policy"] is not None:
            self["policy-rules"] = loadPolicy(self["policy"])

    def ratsTls(self, server):
        """
        The rats-tls settings of one leg; ENG's role defaults unless the
        plugins are named.
        """
        from ent.ratstls import _LOG_LEVEL_NAMES

        level = self["rats-tls-log-level"].lower()
        if level not in _LOG_LEVEL_NAMES:
            raise ConfigurationError(f"--rats-tls-log-level {level!r} is not one of {', '.join(_LOG_LEVEL_NAMES)}")
        attester = self["attester"] or ("sgx_ecdsa" if server else "nullattester")
        verifier = self["verifier"] or ("nullverifier" if server else "sgx_ecdsa")
        for name, value in (
            ("attester", attester),
            ("verifier", verifier),
            ("tls-type", self["tls-type"]),
            ("crypto-type", self["crypto-type"]),
        ):
            if not _PLUGIN_NAME.fullmatch(value):
                raise ConfigurationError(
                    f"--{name} {value!r} is not a plugin name (up to 31 letters, digits, '_', '.', '-')"
                )
        if self["rats-tls-lib"] is not None:
            _checkReadable(self["rats-tls-lib"], "--rats-tls-lib")
        return RatsTlsChoice(
            library=self["rats-tls-lib"],
            attester=attester,
            verifier=verifier,
            tlsType=self["tls-type"],
            cryptoType=self["crypto-type"],
            # With a policy, the accepting side verifies the connecting one:
            # librats_tls checks a client only when asked for mutual.
            # ... and it presents its own evidence only when it is mutual
            # too: a connecting side with an attester that attests does.
            mutual=bool(self["mutual"])
            or (server and self.get("policy") is not None)
            or (not server and attester != "nullattester"),
            logLevel=_LOG_LEVEL_NAMES[level],
            server=server,
            claims=() if server else tuple(self.get("claims", ())),
        )

    def checkVerifiers(self, *legs):
        """
        A policy that names measurements or claims must not meet them
        through a verifier that checks nothing: nullverifier accepts any
        evidence, so whoever connects could claim any MRENCLAVE.  C{legs}:
        C{(roles, security, flag)} of each leg of this process.
        """
        policy = self.get("policy-rules")
        if policy is None:
            return
        for roles, security, flag in legs:
            if security is None or security.kind != "rats-tls" or security.ratsTls.verifier != "nullverifier":
                continue
            for role in roles:
                for identity in policy.forRole(role):
                    if identity.needsEvidence():
                        raise ConfigurationError(
                            f"--policy {self['policy']}: identity {identity.name!r} (line {identity.line}) asks for "
                            f"evidence, but the {flag} legs verify with nullverifier, which accepts any: give "
                            "--verifier sgx_ecdsa (or another that checks quotes)"
                        )

    def tlsFiles(self):
        missing = [f"--{n}" for n in ("tls-cert", "tls-key", "tls-ca") if not self[n]]
        if missing:
            raise ConfigurationError(f"a TLS leg needs {', '.join(missing)}")
        for name in ("tls-cert", "tls-key", "tls-ca"):
            _checkReadable(self[name], f"--{name}")
        return TlsFiles(self["tls-cert"], self["tls-key"], self["tls-ca"])

    def legSecurity(self, leg, connect=None, nameOption=None, listen=None):
        """
        The protection of leg C{leg} ("entg" or "enta") from the flags
        C{--LEG-tls}; C{connect} is the leg's client description when this
        side connects, C{None} when it accepts.
        """
        if self[f"{leg}-tls"] and self[f"{leg}-rats-tls"]:
            raise ConfigurationError(f"--{leg}-tls and --{leg}-rats-tls exclude each other")
        budget = _seconds(self, "handshake-timeout")
        if self[f"{leg}-rats-tls"]:
            if connect is not None and hostOf(connect) is None:
                raise ConfigurationError(f"--{leg}-rats-tls needs HOST:PORT, not {connect!r}")
            if listen is not None and not isPlainListen(listen):
                raise ConfigurationError(f"--{leg}-rats-tls needs PORT or ADDR:PORT to listen on, not {listen!r}")
            return LegSecurity("rats-tls", ratsTls=self.ratsTls(server=connect is None), handshakeTimeout=budget)
        if not self[f"{leg}-tls"]:
            return LegSecurity("tcp", handshakeTimeout=budget)
        files = self.tlsFiles()
        if connect is None:
            return LegSecurity("tls", tlsFiles=files, handshakeTimeout=budget)
        name = self[nameOption] or hostOf(connect)
        if self[nameOption] is not None and not re.fullmatch(r"\S+", name):
            raise ConfigurationError(f"--{nameOption} {name!r} is not a DNS name or an IP address")
        if name is None:
            raise ConfigurationError(f"give --{nameOption}: the peer's name cannot be taken from {connect!r}")
        return LegSecurity("tls", tlsFiles=files, peerName=name, handshakeTimeout=budget)


class EntaOptions(SecurityOptions):
    """
    Options of the agent.
    """

    command = "enta"
    synopsis = "[options]"
    longdesc = (
        "ENTA: carry this host's connections through the tunnel. "
        "With --map (or ENG's --dport) it captures the app's connections "
        "(client host); with --expose (or ENG's --replay) it hands the "
        "tunnel's connections to local services (server host), and accepts "
        "nothing else from the tunnel. With none of these it is a bare TUN "
        "endpoint, as ENG's plain agent: it installs no rules and carries "
        "whatever the host routes into the TUN. With --stack user it needs "
        "no TUN, no netfilter and no root: a user-space TCP/IP stack "
        "(libslirp) carries local ports given with --listen (client) or the "
        "--expose services (server)."
    )

    optParameters = [
        ["replay", None, None, "Replay tunnel connections to this local TCP port (server host)."],
        [
            "entg-connect",
            None,
            f"127.0.0.1:{AGENT_PORT}",
            "Gateway to connect to: HOST:PORT or a Twisted client endpoint string.",
        ],
        [
            "stack",
            None,
            "kernel",
            "Capture with the kernel's stack (a TUN, netfilter rules, needs root) or a user-space "
            "stack in the process (user: no TUN, no rules, no privileges; with --listen or --expose).",
        ],
        ["tun-name", None, "tun0", "Name of the TUN device to create."],
        [
            "tun-addr",
            None,
            None,
            "TUN address ADDR[/PREFIX] (default 192.168.0.254/24 with --replay, else 192.168.0.1/24).",
        ],
        ["tun-mask", None, None, "TUN netmask, dotted or prefix length (ENG compatibility)."],
        [
            "peer-addr",
            None,
            None,
            "The far agent's tunnel address (default: the other of 192.168.0.1 and 192.168.0.254).",
        ],
        ["tunnel-port", None, str(TUNNEL_PORT), "In-tunnel service port."],
        ["mtu", None, str(DEFAULT_MTU), f"TUN MTU ({MIN_MTU}-{MAX_PACKET})."],
        [
            "route-table",
            None,
            "auto",
            "Routing table number for the capture policy route (default: one no other agent uses).",
        ],
        [
            "entg-tls-name",
            None,
            None,
            "TLS: the name (DNS or IP) the gateway's certificate must carry (default: the host of --entg-connect).",
        ],
    ]
    optFlags = [
        ["entg-tls", None, "Protect the leg to the gateway with mutual TLS (--tls-cert, --tls-key, --tls-ca)."],
        ["entg-rats-tls", None, "Protect the leg to the gateway with rats-tls (attested TLS)."],
        [
            "announce",
            None,
            "On connecting, send the gateway one packet from the TUN address to itself, so a gateway "
            "with several agents routes to this one before it sends anything (ENG's gateway passes "
            "it on; the far kernel drops it).",
        ],
    ]

    def __init__(self):
        usage.Options.__init__(self)
        self["dports"] = []
        self["maps"] = []
        self["exposes"] = []
        self["capture-from"] = []
        self["listens"] = []

    def opt_listen(self, value):
        """
        With --stack user: accept local connections on [ADDR:]PORT[/udp]
        (ADDR 127.0.0.1 unless given) and carry each to TUNADDR:PORT inside
        the tunnel (client side, as ssh -L); repeatable.
        """
        self["listens"].append(_usage(parseListen)(value))

    def opt_capture_from(self, value):
        """
        Also capture the connections routed through this host that arrive on
        interface IFACE (a container bridge or a VM's veth); repeatable.
        """
        if not _INTERFACE_NAME.fullmatch(value) or len(value.encode()) > 15:
            raise usage.UsageError(f"--capture-from {value!r} is not an interface name")
        if value not in self["capture-from"]:
            self["capture-from"].append(value)

    def opt_map(self, value):
        """
        Send the app's connections to [ADDR:]PORT[/udp] to TUNADDR:PORT inside
        the tunnel (client host; any address when ADDR is left out); repeatable.
        """
        self["maps"].append(_usage(parseMapping)(value))

    def opt_expose(self, value):
        """
        Hand what arrives from the tunnel on TUNPORT[/udp] to [HOST:]PORT
        (server host; default this host, the same port); repeatable.
        """
        self["exposes"].append(_usage(parseExposure)(value))

    def opt_dport(self, value):
        """
        Capture the app's TCP connections to PORT[,PORT...] (client host); repeatable.
        """
        self["dports"].extend(_usage(_ports)(value, "--dport"))

    def opt_capture(self, value):
        """
        ENG's name for --dport.
        """
        self["dports"].extend(_usage(_ports)(value, "--capture"))

    @_usage
    def postOptions(self):
        self.checkObservability()
        self.checkPolicy()
        self._checkStack()
        replay = self["replay"]
        client = "--dport" if self["dports"] else "--map" if self["maps"] else "--listen" if self["listens"] else None
        server = "--replay" if replay is not None else "--expose" if self["exposes"] else None
        if client and server:
            raise ConfigurationError(f"{client} and {server} exclude each other")
        self["role"] = "replay" if server else "capture" if client else "bare"
        if self["stack"] == "user" and self["role"] == "bare":
            raise ConfigurationError("--stack user carries only what --listen or --expose (or --replay) name: give one")
        if self["capture-from"] and not client:
            raise ConfigurationError(
                f"--capture-from {self['capture-from'][0]} captures for --map or --dport: give one"
            )
        if replay is not None:
            self["replay"] = parsePort(replay, "--replay")
        self["dports"] = tuple(dict.fromkeys(self["dports"]))
        self["tunnel-port"] = parsePort(self["tunnel-port"], "--tunnel-port")
        checkClientDescription(self["entg-connect"], "--entg-connect")
        mtu = _number(self, "mtu")
        if not MIN_MTU <= mtu <= MAX_PACKET:
            raise ConfigurationError(f"--mtu {mtu} is out of range {MIN_MTU}-{MAX_PACKET}")
        self["mtu"] = mtu
        name = self["tun-name"]
        if not _INTERFACE_NAME.fullmatch(name) or len(name.encode()) > 15 or name in (".", ".."):
            raise ConfigurationError(
                f"--tun-name {name!r} is not a valid interface name "
                f"(1-15 bytes, not . or .., no space, '/', ':' or '%')"
            )
        if self["stack"] == "kernel":
            self._checkBesideOthers()
        else:
            self["route-table"] = None
            self["gateway-port"] = None
            if mtu > MAX_USER_MTU:
                # libslirp's largest; a TUN far side at 65535 still works.
                self["mtu"] = MAX_USER_MTU
        self._tunAddress()
        self._peerAddress()
        self._services()
        self["entg-security"] = self.legSecurity("entg", self["entg-connect"], "entg-tls-name")
        self.checkVerifiers((("gateway",), self["entg-security"], "--entg-rats-tls"))

    def _checkStack(self):
        """
        The user-space stack installs nothing: the flags that configure the
        host's capture are refused with it, and --listen needs it.
        """
        if self["stack"] not in ("kernel", "user"):
            raise ConfigurationError(f"--stack {self['stack']!r} is neither kernel nor user")
        if self["stack"] == "kernel":
            if self["listens"]:
                raise ConfigurationError(
                    f"{self['listens'][0].flag} needs --stack user (with the kernel's stack, use --map)"
                )
            return
        for given, flag, instead in (
            (self["maps"], "--map", "--listen"),
            (self["dports"], "--dport", "--listen"),
            (self["capture-from"], "--capture-from", None),
        ):
            if given:
                hint = f"; use {instead}" if instead else ""
                raise ConfigurationError(f"{flag} captures with netfilter, which --stack user does not use{hint}")
        if self["route-table"] != "auto":
            raise ConfigurationError("--route-table is for the kernel's stack; --stack user installs no route")

    def _checkBesideOthers(self):
        """
        What can be told without the kernel about sharing the host: the
        route table, and captures that would loop (the agent's own gateway
        connection, or its metrics port).
        """
        table = self["route-table"]
        if table == "auto":
            self["route-table"] = None
        else:
            try:
                self["route-table"] = _number(self, "route-table")
            except ConfigurationError:
                raise ConfigurationError(f"--route-table {table!r} is neither a number nor auto")
            if not 1 <= self["route-table"] < 2**31 or self["route-table"] in (253, 254, 255):
                raise ConfigurationError(f"--route-table {table} is reserved or out of range")
        tableName(self["tun-name"])
        self["gateway-port"] = tcpPortOf(self["entg-connect"])
        metrics = self["metrics"] and tcpPortOf(self["metrics"], server=True)
        captured = {p: f"--dport {p}" for p in self["dports"]}
        captured.update((m.port, m.flag) for m in self["maps"] if m.proto == "tcp")
        for port, what in (
            (self["gateway-port"], "the gateway's port (--entg-connect)"),
            (metrics, "the --metrics port"),
        ):
            if port in captured:
                raise ConfigurationError(f"{captured[port]} is {what}: capturing it would loop into the tunnel")

    def _tunAddress(self):
        local = SERVER_TUN_ADDRESS if self["role"] == "replay" else CLIENT_TUN_ADDRESS
        text = self["tun-addr"] or local
        address, _, prefix = text.partition("/")
        if self["tun-mask"] is not None:
            if prefix:
                raise ConfigurationError("give the prefix in --tun-addr or --tun-mask, not both")
            prefix = self["tun-mask"]
        prefix = prefix or str(TUN_PREFIX)
        given = f"--tun-addr {text!r}"
        if self["tun-mask"] is not None:
            given += f" --tun-mask {self['tun-mask']!r}"
        try:
            interface = ipaddress.IPv4Interface(f"{address}/{prefix}")
        except ValueError as e:
            raise ConfigurationError(f"{given}: {e}")
        if interface.network.prefixlen > 30:
            raise ConfigurationError(f"{given}: the TUN network {interface.network} is too small for two agents")
        special = _specialAddress(interface.ip, interface.network)
        if special:
            raise ConfigurationError(f"{given}: {interface.ip} is the {special} of {interface.network}")
        self["tun-interface"] = interface

    def _peerAddress(self):
        interface = self["tun-interface"]
        if self["peer-addr"] is None and self["role"] == "bare":
            # No rule of a bare endpoint names the peer.
            return
        if self["peer-addr"] is None:
            defaults = {CLIENT_TUN_ADDRESS: SERVER_TUN_ADDRESS, SERVER_TUN_ADDRESS: CLIENT_TUN_ADDRESS}
            peer = defaults.get(str(interface.ip))
            if peer is None:
                raise ConfigurationError(f"--tun-addr {interface.ip} is not one of ENT's defaults: give --peer-addr")
        else:
            peer = self["peer-addr"]
        try:
            peer = ipaddress.IPv4Address(peer)
        except ValueError as e:
            raise ConfigurationError(f"--peer-addr {peer!r}: {e}")
        if peer not in interface.network or peer == interface.ip:
            raise ConfigurationError(
                f"--peer-addr {peer} must be another address in the TUN network {interface.network}"
            )
        special = _specialAddress(peer, interface.network)
        if special:
            raise ConfigurationError(
                f"--peer-addr {peer} is the {special} of the TUN network {interface.network}, not an agent's"
            )
        self["peer-addr"] = peer

    def _services(self):
        """
        The mappings and exposures, ENG's flags as their special cases:
        --dport PORT is --map PORT=PEER:6978, --replay PORT is
        --expose 6978=PORT.
        """
        o = self
        tunnelPort = o["tunnel-port"]
        dports = [Mapping("tcp", None, p, str(o["peer-addr"]), tunnelPort, f"--dport {p}") for p in o["dports"]]
        o["mappings"] = checkUnique(dports + o["maps"])
        replay = [Exposure("tcp", tunnelPort, None, o["replay"], f"--replay {o['replay']}")] if o["replay"] else []
        o["exposures"] = checkUnique(replay + o["exposes"])
        interface = o["tun-interface"]
        o["listens"] = checkUnique(o["listens"])
        for mapping in (*o["maps"], *o["listens"]):
            target = ipaddress.IPv4Address(mapping.tunAddress)
            if target not in interface.network or target == interface.ip:
                raise ConfigurationError(
                    f"{mapping.flag}: {target} is not a far agent's address in the TUN network {interface.network}"
                )


class PeerConnect(NamedTuple):
    """
    One C{--entg-connect}: where the peer is, the prefixes that route to
    it (empty: whatever has no other route, when it is the only peer) and
    the leg's protection.
    """

    description: str
    routes: tuple
    security: object


def parsePeerConnect(text):
    """
    C{(description, prefixes)} from C{HOST:PORT[=PREFIX[,PREFIX...]]} or a
    client endpoint string, whose own C{=} are told apart by what follows
    the last one: prefixes only if all of it reads as IP networks.
    """
    description, sep, tail = text.rpartition("=")
    if not sep:
        return text, ()
    if hostOf(description) is not None or "/" in tail:
        return description, _prefixList(tail, f"--entg-connect {text!r}")
    try:
        return description, _prefixList(tail, "")
    except ConfigurationError:
        return text, ()


def _prefixList(text, what):
    """
    C{PREFIX[,PREFIX...]} as IP networks, or a L{ConfigurationError} that
    names C{what}.
    """
    prefixes = []
    for part in text.split(","):
        try:
            prefixes.append(ipaddress.ip_network(part.strip()))
        except ValueError as e:
            raise ConfigurationError(f"{what}: {e}")
    return tuple(prefixes)


def _overlap(mine, theirs):
    """
    C{(one of mine, one of theirs)} that overlap, or C{None}.
    """
    for m in mine:
        for t in theirs:
            if t.version == m.version and t.overlaps(m):
                return m, t
    return None


def _specialAddress(address, network):
    """
    "network address" or "broadcast address" if C{address} is one of
    C{network}'s, which no agent can have; else C{None}.
    """
    if address == network.network_address:
        return "network address"
    if address == network.broadcast_address:
        return "broadcast address"
    return None


class EntgOptions(SecurityOptions):
    """
    Options of the gateway.
    """

    command = "entg"
    synopsis = "[options]"
    longdesc = (
        "ENTG: relay frames between this side's agents and the peer gateways, "
        "each frame to the leg that owns its destination address. "
        "A gateway connects to its peers (--entg-connect, repeatable), "
        "accepts them (--entg-listen, the default), or both."
    )

    optParameters = [
        [
            "enta-listen",
            None,
            str(AGENT_PORT),
            "Where to accept the agent: PORT, ADDR:PORT or a server endpoint string.",
        ],
        [
            "entg-listen",
            None,
            None,
            f"Where to accept peer gateways (default {GATEWAY_PORT} when --entg-connect is not given); "
            "what lives behind an accepted peer is learned from its frames' sources.",
        ],
        [
            "entg-tls-name",
            None,
            None,
            "TLS: the name (DNS or IP) the peer gateway's certificate must carry "
            "(default: the host of --entg-connect).",
        ],
    ]
    optFlags = [
        ["enta-tls", None, "Protect the agent's leg with mutual TLS (--tls-cert, --tls-key, --tls-ca)."],
        ["entg-tls", None, "Protect the peer gateway's leg with mutual TLS."],
        ["enta-rats-tls", None, "Protect the agent's leg with rats-tls (attested TLS)."],
        ["entg-rats-tls", None, "Protect the peer gateway's leg with rats-tls."],
        ["agent-to-agent", None, "Route frames between agents of this gateway (dropped by default)."],
    ]
    optParameters = optParameters + [
        [
            "max-legs",
            None,
            str(DEFAULT_MAX_LEGS),
            "Accept at most this many agent and peer legs in all (beyond, the oldest that has not yet "
            "sent a frame or authenticated is closed to make room, else the new one is refused).",
        ],
        ["max-legs-per-source", None, str(DEFAULT_MAX_LEGS_PER_SOURCE), "The same, per source address."],
    ]

    def __init__(self):
        usage.Options.__init__(self)
        self["allowed-ips"] = {}
        self["entg-connect"] = None
        self["entg-peers"] = []

    @_helpText
    def opt_entg_connect(self, value):
        """
        HOST:PORT[=PREFIX[,PREFIX...]] or a client endpoint string: a peer
        gateway to connect to, and the tunnel addresses behind it (without
        prefixes, and as the only one: everything). Repeatable.
        """
        _usage(self._entgConnect)(value)

    def _entgConnect(self, value):
        description, routes = parsePeerConnect(value)
        for other in self["entg-peers"]:
            if other.description == description:
                raise ConfigurationError(f"--entg-connect {description!r} is given twice")
            clash = _overlap(routes, other.routes)
            if clash:
                raise ConfigurationError(
                    f"--entg-connect {value!r}: {clash[0]} overlaps {clash[1]} of {other.description}"
                )
        self["entg-peers"].append(PeerConnect(description, routes, None))
        if self["entg-connect"] is None:
            self["entg-connect"] = description

    @_helpText
    def opt_allowed_ips(self, value):
        """
        NAME=PREFIX[,PREFIX...]: the leg whose TLS peer certificate names
        NAME (subjectAltName DNS or IP, else CN) owns these prefixes: they
        route to it, and an agent may send only from them. Repeatable.
        """
        _usage(self._allowedIps)(value)

    def _allowedIps(self, value):
        name, sep, text = value.partition("=")
        name = name.strip()
        if not sep or not name or not text.strip():
            raise ConfigurationError(f"--allowed-ips {value!r}: give NAME=PREFIX[,PREFIX...]")
        if name in self["allowed-ips"]:
            raise ConfigurationError(f"--allowed-ips names {name} twice")
        prefixes = _prefixList(text, f"--allowed-ips {name}")
        for other, theirs in self["allowed-ips"].items():
            clash = _overlap(prefixes, theirs)
            if clash:
                raise ConfigurationError(f"--allowed-ips {name}: {clash[0]} overlaps {clash[1]} of {other}")
        self["allowed-ips"][name] = prefixes

    @_usage
    def postOptions(self):
        self.checkObservability()
        self.checkPolicy()
        for name in ("max-legs", "max-legs-per-source"):
            self[name] = _number(self, name)
            if self[name] < 1:
                raise ConfigurationError(f"--{name} {self[name]} must be at least 1")
        if self["policy"] is not None and self["allowed-ips"]:
            raise ConfigurationError(
                "--allowed-ips and --policy exclude each other: write each NAME=PREFIX as an identity with "
                "tls-names = [NAME] and addresses = [PREFIX] in the policy (docs/security.md)"
            )
        peers = self["entg-peers"]
        if not peers and self["entg-listen"] is None:
            self["entg-listen"] = str(GATEWAY_PORT)
        if len(peers) > 1:
            for peer in peers:
                if not peer.routes:
                    raise ConfigurationError(
                        f"--entg-connect {peer.description!r} needs =PREFIX[,PREFIX...]: "
                        "with several peers each names the tunnel addresses behind it"
                    )
            if self["entg-tls-name"] is not None:
                raise ConfigurationError(
                    "--entg-tls-name names one peer: with several --entg-connect each certificate must name its host"
                )
        for peer in peers:
            checkClientDescription(peer.description, "--entg-connect")
        for name in ("enta-listen", "entg-listen"):
            if self[name] is not None:
                checkServerDescription(self[name], f"--{name}")
        self["enta-security"] = self.legSecurity("enta", listen=self["enta-listen"])
        self["entg-peers"] = [
            peer._replace(security=self.legSecurity("entg", peer.description, "entg-tls-name")) for peer in peers
        ]
        self["entg-listen-security"] = None
        if self["entg-listen"] is not None:
            self["entg-listen-security"] = self.legSecurity("entg", listen=self["entg-listen"])
        # The peer leg's protection as one value, for what shows it.
        self["entg-security"] = self["entg-peers"][0].security if peers else self["entg-listen-security"]
        self.checkVerifiers(
            (("agent",), self["enta-security"], "--enta-rats-tls"),
            *((("peer",), peer.security, "--entg-rats-tls") for peer in self["entg-peers"]),
            (("peer",), self["entg-listen-security"], "--entg-rats-tls"),
        )
        if self["allowed-ips"] and "tls" not in (self["enta-security"].kind, self["entg-security"].kind):
            raise ConfigurationError("--allowed-ips names TLS identities: give --enta-tls or --entg-tls")
