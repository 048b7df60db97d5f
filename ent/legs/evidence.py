"""
What a verified rats-tls peer showed of itself, as a policy reads it.

The binding (L{ent.ratstls}) fills one L{Evidence} from the library's
C{rtls_evidence_t} in the verification callback; L{ent.legs.policy}
matches it against the identities of C{--policy}.  Only SGX ECDSA evidence
carries measurements: the library fills them for no other type (see
shared/RATS-TLS.md), so for the rest they are C{None} and a policy that asks
for them cannot match.
"""

from dataclasses import dataclass, field

#: C{rtls_evidence_t.type} values (enum rtls_evidence_type_t).
EVIDENCE_TYPES = {1: "sgx_ecdsa", 2: "tdx_ecdsa", 3: "csv"}
#: Bit 1 of the SGX attributes' flags: the enclave is a debug enclave.
SGX_FLAGS_DEBUG = 0x02


@dataclass(frozen=True)
class Evidence:
    """
    C{kind}: "sgx_ecdsa", "tdx_ecdsa", "csv" or "none" (no evidence, e.g. a
    nullattester peer).  The SGX fields are C{None} unless C{kind} is
    "sgx_ecdsa".  C{claims}: the rats-tls custom claims (2025 library), name
    to value, as sorted pairs.
    """

    kind: str = "none"
    mrenclave: bytes | None = None
    mrsigner: bytes | None = None
    isvprodid: int | None = None
    isvsvn: int | None = None
    debug: bool | None = None
    claims: tuple = field(default=())

    def claim(self, name):
        """
        The value of custom claim C{name}, or C{None}.
        """
        for key, value in self.claims:
            if key == name:
                return value
        return None

    def summary(self):
        """
        A short line for status, C{/legs} and logs, e.g.
        C{sgx_ecdsa mrenclave 9f3a1c2b… svn 2}.
        """
        if self.kind != "sgx_ecdsa" or self.mrenclave is None:
            text = self.kind
        else:
            text = f"{self.kind} mrenclave {self.mrenclave.hex()[:8]}… svn {self.isvsvn}"
            if self.debug:
                text += " debug"
        if self.claims:
            text += f" claims {','.join(name for name, _ in self.claims)}"
        return text

    def asDict(self):
        """
        For JSON: hex measurements, claims as text where they decode.
        """

        def text(value):
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError:
                return value.hex()

        return {
            "type": self.kind,
            "mrenclave": self.mrenclave.hex() if self.mrenclave is not None else None,
            "mrsigner": self.mrsigner.hex() if self.mrsigner is not None else None,
            "isvprodid": self.isvprodid,
            "isvsvn": self.isvsvn,
            "debug": self.debug,
            "claims": {name: text(value) for name, value in self.claims},
        }


NO_EVIDENCE = Evidence()
