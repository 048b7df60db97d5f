"""
C{--policy FILE}: which identities may attach a leg, and what each may do.

The file (TOML) lists identities. Each says how it is recognised (its TLS
names, the leg's source address, its SGX measurements, its rats-tls
claims: every key given must match) and what it is granted (the addresses
it owns, the tunnel services it may reach). A leg is attached only once it
matches an identity of its role: C{agent} and C{peer} on a gateway,
C{gateway} on an agent.

Everything costly happens when the file is read: prefixes, hex and
services are parsed once, so L{Policy.match}, which runs once per leg that
comes up (possibly thousands of times in a flood of connections), only
compares values, and L{Identity.allowsService}, which may run per flow, is
one set look-up.

C{--allowed-ips} is the same thing written on the command line
(L{allowedIpsPolicy}), so the router knows one kind of rule.
"""

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field

from ent.errors import PolicyError

ROLES = ("agent", "peer", "gateway")
#: IP protocol numbers of the services a policy can name.
PROTOCOLS = {"tcp": 6, "udp": 17}

IDENTITY_KEYS = ("name", "role", "tls-names", "from", "sgx", "claims", "addresses", "services")
SGX_KEYS = ("mrenclave", "mrsigner", "isvprodid", "min-isvsvn", "debug")
#: The order in which a refusal reports the first key that differs.
KEY_ORDER = (
    "tls-names",
    "from",
    "sgx.mrenclave",
    "sgx.mrsigner",
    "sgx.isvprodid",
    "sgx.min-isvsvn",
    "sgx.debug",
    "claims",
)

_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_HEX64 = re.compile(r"[0-9A-Fa-f]{64}")
_ARRAY_HEADER = re.compile(r"\[\[\s*([^\]]+?)\s*\]\]")
_TABLE_HEADER = re.compile(r"\[\s*([^\[\]]+?)\s*\]")
_KEY = re.compile(r"""((?:[A-Za-z0-9_\-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_\-]+|"[^"]*"|'[^']*'))*)\s*=""")
_KEY_PART = re.compile(r""""([^"]*)"|'([^']*)'|([A-Za-z0-9_\-]+)""")
_TOML_POSITION = re.compile(r"^(.*) \(at line (\d+), column (\d+)\)$", re.S)
_TOML_END = re.compile(r"^(.*) \(at end of document\)$", re.S)


def _short(value):
    """
    Measurements are long: eight hex digits tell them apart in a log line.
    """
    return value.hex()[:8] + "…"


def _network(value):
    return value if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network) else ipaddress.ip_network(value)


def _address(value):
    return value if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address) else ipaddress.ip_address(value)


def _claimText(value):
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return "0x" + value.hex()
    if len(text) > 40:
        text = text[:40] + "…"
    return repr(text)


def _wants(values):
    values = [str(v) for v in values]
    return values[0] if len(values) == 1 else "one of " + ", ".join(values)


@dataclass(frozen=True)
class Service:
    """
    One tunnel service an agent may reach: an address, a port and C{tcp}
    or C{udp}.
    """

    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int
    proto: str

    def __post_init__(self):
        object.__setattr__(self, "address", _address(self.address))

    @property
    def protoNumber(self):
        return PROTOCOLS[self.proto]

    def __str__(self):
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{host}:{self.port}/{self.proto}"


def parseService(text):
    """
    C{192.168.0.254:80/tcp} or C{[fd00::1]:443/udp} as a L{Service};
    L{ValueError} with a sentence otherwise.
    """
    shape = "must be ADDRESS:PORT/tcp or ADDRESS:PORT/udp (IPv6 as [ADDRESS]:PORT/tcp)"
    hostPort, slash, proto = text.rpartition("/")
    proto = proto.lower()
    if not slash or proto not in PROTOCOLS:
        raise ValueError(shape)
    if hostPort.startswith("["):
        host, bracket, port = hostPort[1:].partition("]:")
        if not bracket:
            raise ValueError(shape)
    else:
        host, colon, port = hostPort.rpartition(":")
        if not colon:
            raise ValueError(shape)
        if ":" in host:
            raise ValueError("has an IPv6 address without brackets: write [ADDRESS]:PORT/PROTO")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"has {host!r}, which is not an IP address")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"has port {port!r}: a port is 1 to 65535")
    if address.version == 4 and hostPort.startswith("["):
        raise ValueError("has an IPv4 address in brackets")
    return Service(address, int(port), proto)


@dataclass(frozen=True)
class Identity:
    """
    One C{[[identity]]} of a policy: how a leg is recognised as it (every
    key that is not C{None} must match) and what it is granted.

    C{addresses} C{None}: learned from its frames, as without a policy;
    C{services} C{None}: every destination. C{line}: where the identity
    starts in its file, for messages.
    """

    name: str
    role: str
    tlsNames: tuple | None = None
    sources: tuple | None = None
    mrenclave: bytes | None = None
    mrsigner: bytes | None = None
    isvprodid: int | None = None
    minIsvsvn: int | None = None
    debug: bool = False
    claims: tuple = ()
    addresses: tuple | None = None
    services: tuple | None = None
    line: int = 0
    _tlsNameSet: frozenset = field(init=False, repr=False, compare=False)
    _serviceKeys: frozenset = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        # Accept lists and text from callers building identities by hand
        # (tests, --allowed-ips); matching then sees one form only.
        def put(name, value):
            object.__setattr__(self, name, value)

        if self.tlsNames is not None:
            put("tlsNames", tuple(self.tlsNames))
        if self.sources is not None:
            put("sources", tuple(_network(p) for p in self.sources))
        if self.addresses is not None:
            put("addresses", tuple(_network(p) for p in self.addresses))
        if self.services is not None:
            put("services", tuple(s if isinstance(s, Service) else parseService(s) for s in self.services))
        put("claims", tuple(sorted((name, v.encode("utf-8") if isinstance(v, str) else v) for name, v in self.claims)))
        put("_tlsNameSet", frozenset(self.tlsNames or ()))
        put("_serviceKeys", frozenset((s.address.packed, s.port, s.protoNumber) for s in self.services or ()))

    def needsEvidence(self):
        """
        Whether only a verified rats-tls leg can match: a measurement or a
        claim is asked for. (C{sgx.debug = true} only allows, so it asks
        for nothing.)
        """
        return bool(
            self.mrenclave is not None
            or self.mrsigner is not None
            or self.isvprodid is not None
            or self.minIsvsvn is not None
            or self.claims
        )

    def allowsService(self, proto, address, port):
        """
        Whether this identity may reach C{address} (packed, 4 or 16 bytes)
        port C{port} over IP protocol C{proto} (6 or 17).
        """
        if self.services is None:
            return True
        if type(address) is not bytes:
            address = bytes(address)
        return (address, port, proto) in self._serviceKeys

    def grantsText(self):
        """
        What this identity is granted, short, for logs and status.
        """
        if self.addresses is None:
            parts = ["addresses learned"]
        else:
            parts = ["addresses " + (", ".join(str(p) for p in self.addresses) or "none")]
        if self.role == "agent":
            if self.services is None:
                parts.append("services any")
            else:
                parts.append("services " + (", ".join(str(s) for s in self.services) or "none"))
        return "; ".join(parts)

    def _differingKeys(self, facts):
        """
        The keys of this identity that C{facts} does not match, in
        L{KEY_ORDER}, lazily: matching stops at the first.
        """
        if self.tlsNames is not None:
            names = self._tlsNameSet
            if not any(n in names for n in facts.tlsNames):
                yield "tls-names"
        if self.sources is not None and not _inSources(facts.source, self.sources):
            yield "from"
        evidence = facts.evidence
        if self.mrenclave is not None and getattr(evidence, "mrenclave", None) != self.mrenclave:
            yield "sgx.mrenclave"
        if self.mrsigner is not None and getattr(evidence, "mrsigner", None) != self.mrsigner:
            yield "sgx.mrsigner"
        if self.isvprodid is not None and getattr(evidence, "isvprodid", None) != self.isvprodid:
            yield "sgx.isvprodid"
        if self.minIsvsvn is not None:
            svn = getattr(evidence, "isvsvn", None)
            if svn is None or svn < self.minIsvsvn:
                yield "sgx.min-isvsvn"
        if not self.debug and getattr(evidence, "debug", None):
            yield "sgx.debug"
        for name, value in self.claims:
            if evidence is None or evidence.claim(name) != value:
                yield "claims." + name

    def _detail(self, key, facts):
        """
        The sentence of a refusal on C{key}: what the leg has, what this
        identity wants.
        """
        policy = f"policy {self.name}"
        evidence = facts.evidence
        if key == "tls-names":
            if facts.tlsNames:
                return f"tls-names are {', '.join(facts.tlsNames)}, {policy} wants {_wants(self.tlsNames)}"
            return f"tls-names: the leg has no certificate, {policy} wants {_wants(self.tlsNames)}"
        if key == "from":
            source = facts.source if facts.source is not None else "unknown"
            return f"from is {source}, {policy} wants {_wants(self.sources)}"
        if key == "sgx.debug":
            return f"sgx.debug is true (a debug enclave), {policy} does not allow it"
        if key.startswith("sgx."):
            field_ = key[4:]
            if field_ == "min-isvsvn":
                have, want = getattr(evidence, "isvsvn", None), f"at least {self.minIsvsvn}"
            elif field_ == "isvprodid":
                have, want = getattr(evidence, "isvprodid", None), str(self.isvprodid)
            else:
                have, want = getattr(evidence, field_, None), _short(getattr(self, field_))
            if have is None:
                return f"{key}: the leg carries no SGX evidence ({_evidenceText(facts)}), {policy} wants {want}"
            if field_ == "min-isvsvn":
                return f"sgx.min-isvsvn: the enclave's isvsvn is {have}, {policy} wants {want}"
            if isinstance(have, bytes):
                have = _short(have)
            return f"{key} is {have}, {policy} wants {want}"
        name = key[len("claims.") :]
        want = _claimText(dict(self.claims)[name])
        have = evidence.claim(name) if evidence is not None else None
        if have is None:
            if evidence is None:
                return f"{key} is missing ({_evidenceText(facts)}), {policy} wants {want}"
            return f"{key} is missing, {policy} wants {want}"
        return f"{key} is {_claimText(have)}, {policy} wants {want}"


def _inSources(source, sources):
    if source is None:
        return False
    if any(source in prefix for prefix in sources):
        return True
    # A dual-stack listener sees an IPv4 client as ::ffff:a.b.c.d.
    mapped = getattr(source, "ipv4_mapped", None)
    return mapped is not None and any(mapped in prefix for prefix in sources)


def _evidenceText(facts):
    if facts.evidence is not None:
        return f"rats-tls evidence {facts.evidence.kind}"
    if facts.kind == "rats-tls":
        return "the other side's rats-tls evidence was not verified"
    return f"a {facts.kind} leg has no evidence"


@dataclass(frozen=True)
class LegFacts:
    """
    What is known of a leg when it comes up: the role it would take, its
    TCP source, its certificate's names and its verified rats-tls evidence
    (an L{ent.legs.evidence.Evidence}, or C{None} when none was verified).
    """

    role: str
    source: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    tlsNames: tuple = ()
    evidence: object = None
    kind: str = "tcp"

    def __post_init__(self):
        if isinstance(self.source, str):
            object.__setattr__(self, "source", ipaddress.ip_address(self.source))
        if not isinstance(self.tlsNames, tuple):
            object.__setattr__(self, "tlsNames", tuple(self.tlsNames))


@dataclass(frozen=True)
class Refusal:
    """
    Why a leg matched no identity: C{detail} is the sentence for the log,
    C{key} the first key of the closest identity (C{identity}) that it did
    not match.
    """

    detail: str
    key: str | None = None
    identity: str | None = None
    reason: str = "policy"


@dataclass(frozen=True)
class Policy:
    """
    The identities of one policy, in file order. C{strict} C{False} (only
    for C{--allowed-ips}): a leg that matches none is treated as without a
    policy, except an agent with TLS names.
    """

    identities: tuple
    path: str | None = None
    strict: bool = True
    _byRole: dict = field(init=False, repr=False, compare=False)
    _byName: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        identities = tuple(self.identities)
        object.__setattr__(self, "identities", identities)
        byRole = {role: [] for role in ROLES}
        byName = {}
        for identity in identities:
            byRole.setdefault(identity.role, []).append(identity)
            byName.setdefault(identity.name, identity)
        object.__setattr__(self, "_byRole", {role: tuple(ids) for role, ids in byRole.items()})
        object.__setattr__(self, "_byName", byName)

    def forRole(self, role):
        return self._byRole.get(role, ())

    def isEmpty(self):
        """
        A policy without identities refuses every leg: worth a warning.
        """
        return not self.identities

    def get(self, name):
        return self._byName.get(name)

    def match(self, facts):
        """
        The first identity of C{facts.role} that the leg matches, else a
        L{Refusal} naming the first key of the closest one.
        """
        candidates = self.forRole(facts.role)
        for identity in candidates:
            for _ in identity._differingKeys(facts):
                break
            else:
                return identity
        if not candidates:
            where = self.path or ("--allowed-ips" if not self.strict else "the policy")
            return Refusal(f"no identity of role {facts.role} in {where}")
        closest, keys = None, None
        for identity in candidates:
            differing = list(identity._differingKeys(facts))
            if keys is None or len(differing) < len(keys):
                closest, keys = identity, differing
        return Refusal(closest._detail(keys[0], facts), key=keys[0], identity=closest.name)


def allowedIpsPolicy(allowedIps):
    """
    C{--allowed-ips NAME=PREFIX,...} (name to prefixes) as a policy: the
    agent or peer whose certificate names NAME owns the prefixes. Not
    strict: a leg without such a name is left to learn, as before.
    """
    identities = []
    for role in ("agent", "peer"):
        for name, prefixes in allowedIps.items():
            identities.append(Identity(name=name, role=role, tlsNames=(name,), addresses=tuple(prefixes)))
    return Policy(tuple(identities), strict=False)


def loadPolicy(path):
    """
    Read and parse the policy file C{path}; L{PolicyError} on any problem.
    """
    path = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise PolicyError(f"{path}: {e.strerror}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PolicyError(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x})")
    return parsePolicy(text, path)


def parsePolicy(text, path="<policy>"):
    """
    The policy written in C{text} (TOML); L{PolicyError} whose message
    starts with C{PATH:LINE:} on any problem.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        message = str(e)
        position = _TOML_POSITION.match(message)
        if position is not None:
            raise PolicyError(f"{path}:{position.group(2)}: {position.group(1)} (column {position.group(3)})")
        end = _TOML_END.match(message)
        line = text.count("\n") + (0 if text.endswith("\n") else 1)
        raise PolicyError(f"{path}:{max(line, 1)}: {end.group(1) if end else message} (at the end of the file)")
    locator = _Locator(text)
    for key in document:
        if key != "identity":
            raise PolicyError(
                f"{path}:{locator.topLine(key)}: unknown key {key!r}: a policy holds only [[identity]] tables"
            )
    entries = document.get("identity", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise PolicyError(
            f"{path}:{locator.topLine('identity')}: identity must be an array of tables, written [[identity]]"
        )
    identities, lines = [], {}
    for index, entry in enumerate(entries):
        identity = _Reader(path, locator, index, entry).identity()
        if identity.name in lines:
            raise PolicyError(
                f'{path}:{locator.line(index, ("name",))}: identity "{identity.name}": name is already used '
                f"by the identity at line {lines[identity.name]}"
            )
        lines[identity.name] = identity.line
        identities.append(identity)
    return Policy(tuple(identities), path=path)


def _splitKey(text):
    return tuple(next(p for p in parts if p) if any(parts) else "" for parts in _KEY_PART.findall(text))


class _Locator:
    """
    Where keys are written: tomllib gives no line numbers, so the text is
    scanned once for the C{[[identity]]} headers, their sub-tables and the
    keys under each.
    """

    def __init__(self, text):
        self.top = {}
        self.identities = []
        current, prefix = self.top, ()
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            header = _ARRAY_HEADER.match(line)
            if header is not None:
                path = _splitKey(header.group(1))
                if path == ("identity",):
                    current, prefix = {(): number}, ()
                    self.identities.append(current)
                else:
                    self.top.setdefault(path[:1], number)
                    current, prefix = self.top, path
                continue
            header = _TABLE_HEADER.match(line)
            if header is not None:
                path = _splitKey(header.group(1))
                if path[:1] == ("identity",) and len(path) > 1 and self.identities:
                    current, prefix = self.identities[-1], path[1:]
                else:
                    current, prefix = self.top, path
                    self.top.setdefault(path[:1], number)
                current.setdefault(prefix, number)
                continue
            key = _KEY.match(line)
            if key is not None:
                current.setdefault(prefix + _splitKey(key.group(1)), number)

    def topLine(self, key):
        return self.top.get((key,), 1)

    def line(self, index, path):
        """
        The line of key C{path} (a tuple, e.g. C{("sgx", "mrenclave")}) of
        the C{index}-th identity, else of the nearest table holding it,
        else of the identity's header.
        """
        if index >= len(self.identities):
            return self.topLine("identity")
        keys = self.identities[index]
        for length in range(len(path), -1, -1):
            if path[:length] in keys:
                return keys[path[:length]]
        return keys[()]


def _show(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return str(value)


class _Reader:
    """
    One C{[[identity]]} table checked and turned into an L{Identity}.
    """

    def __init__(self, path, locator, index, entry):
        self.path, self.locator, self.index, self.entry = path, locator, index, entry
        self.label = f"identity #{index + 1}"

    def fail(self, key, message):
        """
        Raise C{message} at the line of C{key} (a tuple path, e.g.
        C{("sgx", "mrenclave")}, or a bare key name).
        """
        line = self.locator.line(self.index, (key,) if isinstance(key, str) else key or ())
        raise PolicyError(f"{self.path}:{line}: {self.label}: {message}")

    def identity(self):
        entry = self.entry
        name = entry.get("name")
        if name is None:
            self.fail(None, "name is missing")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            self.fail("name", f"name must be ASCII letters, digits, '-', '_' or '.', not {_show(name)}")
        self.label = f'identity "{name}"'
        for key in entry:
            if key not in IDENTITY_KEYS:
                self.fail(key, f"unknown key {key!r} (known: {', '.join(sorted(IDENTITY_KEYS))})")
        role = entry.get("role")
        if role is None:
            self.fail(None, f"role is missing: one of {', '.join(ROLES)}")
        if role not in ROLES:
            self.fail("role", f"role must be one of {', '.join(ROLES)}, not {_show(role)}")

        tlsNames = self.names("tls-names")
        sources = self.prefixes("from")
        sgx = entry.get("sgx", {})
        if not isinstance(sgx, dict):
            self.fail("sgx", f"sgx must be a table (sgx.KEY = ... or [identity.sgx]), not {_show(sgx)}")
        for key in sgx:
            if key not in SGX_KEYS:
                self.fail(("sgx", key), f"unknown key 'sgx.{key}' (known: {', '.join('sgx.' + k for k in SGX_KEYS)})")
        mrenclave = self.measurement(sgx, "mrenclave")
        mrsigner = self.measurement(sgx, "mrsigner")
        isvprodid = self.number(sgx, "isvprodid")
        minIsvsvn = self.number(sgx, "min-isvsvn")
        debug = sgx.get("debug", False)
        if not isinstance(debug, bool):
            self.fail(("sgx", "debug"), f"sgx.debug must be true or false, not {_show(debug)}")
        claims = self.claims()
        addresses = self.prefixes("addresses", empty=True)
        services = self.services(role)

        if (
            tlsNames is None
            and sources is None
            and not (mrenclave or mrsigner or isvprodid is not None or minIsvsvn is not None or claims)
        ):
            self.fail(
                None,
                "has no key that recognises a leg (tls-names, from, sgx.*, claims), so it would match anyone: "
                'to mean anyone, say so with from = ["0.0.0.0/0", "::/0"]',
            )
        return Identity(
            name=name,
            role=role,
            tlsNames=tlsNames,
            sources=sources,
            mrenclave=mrenclave,
            mrsigner=mrsigner,
            isvprodid=isvprodid,
            minIsvsvn=minIsvsvn,
            debug=debug,
            claims=claims,
            addresses=addresses,
            services=services,
            line=self.locator.line(self.index, ()),
        )

    def strings(self, key, what, empty=False):
        value = self.entry.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.fail(key, f"{key} must be a list of {what} in quotes, not {_show(value)}")
        if not value and not empty:
            self.fail(key, f"{key} must list at least one of {what} (an empty list matches nothing)")
        return value

    def names(self, key):
        value = self.strings(key, "names")
        if value is None:
            return None
        for name in value:
            if not name:
                self.fail(key, f"{key} holds an empty name")
        return tuple(value)

    def prefixes(self, key, empty=False):
        value = self.strings(key, "prefixes", empty)
        if value is None:
            return None
        prefixes = []
        for text in value:
            try:
                prefixes.append(ipaddress.ip_network(text))
            except ValueError as e:
                self.fail(key, f"{key}: {text!r} is not a network prefix ({e})")
        return tuple(prefixes)

    def measurement(self, sgx, key):
        value = sgx.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not _HEX64.fullmatch(value):
            self.fail(("sgx", key), f"sgx.{key} must be 64 hex characters, not {_show(value)}")
        return bytes.fromhex(value)

    def number(self, sgx, key):
        value = sgx.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
            self.fail(("sgx", key), f"sgx.{key} must be a whole number from 0 to 65535, not {_show(value)}")
        return value

    def claims(self):
        value = self.entry.get("claims", {})
        if not isinstance(value, dict):
            self.fail("claims", f'claims must be a table (claims.NAME = "VALUE"), not {_show(value)}')
        claims = []
        for name, claim in value.items():
            if not isinstance(claim, str):
                self.fail(("claims", name), f"claims.{name} must be a string in quotes, not {_show(claim)}")
            claims.append((name, claim.encode("utf-8")))
        return tuple(sorted(claims))

    def services(self, role):
        value = self.strings("services", "services", empty=True)
        if value is None:
            return None
        if role != "agent":
            self.fail("services", f"services is only for role agent, not {role}: it limits what an agent may reach")
        services = []
        for text in value:
            try:
                services.append(parseService(text))
            except ValueError as e:
                self.fail("services", f"services: {text!r} {e}")
        return tuple(services)
