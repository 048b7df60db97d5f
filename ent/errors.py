"""
One error hierarchy for ENT.

Every failure ENT reports on purpose is an L{EntError}; its text is written
for an operator, so the services print it as it is, without a traceback.
"""

from twisted.internet.error import ConnectError


class EntError(Exception):
    """
    Base of every error ENT raises on purpose.
    """


class ConfigurationError(EntError):
    """
    The options given cannot work (bad endpoint, unknown address, ...).
    """


class PolicyError(ConfigurationError):
    """
    A C{--policy} file is unreadable or wrong; the message starts with
    C{FILE:LINE:}.
    """


class StartupError(EntError):
    """
    The service could not set up what it needs (TUN, netfilter, routes).
    """


class PrivilegeError(StartupError):
    """
    The process lacks CAP_NET_ADMIN (or root) for a step that needs it.
    """


class TunError(StartupError):
    """
    The TUN device could not be created or configured.
    """


class NetfilterError(StartupError):
    """
    Installing or removing ENT's nftables table failed.
    """


class RoutingError(StartupError):
    """
    Installing or removing ENT's policy rule or route failed.
    """


class UserStackError(StartupError):
    """
    The user-space TCP/IP stack (libslirp) is missing or refused a setting.
    """


class FramingError(EntError):
    """
    A peer sent a byte stream that is not a valid sequence of frames.

    The connection it came on is dropped: the stream cannot be resynchronised.
    """


class FrameTooLarge(FramingError):
    """
    A frame's length prefix exceeds the largest IP packet.
    """


class EmptyFrame(FramingError):
    """
    A frame's length prefix is zero.
    """


class RatsTlsError(EntError):
    """
    A call into librats_tls failed; the message names the step.
    """

    def __init__(self, step, code, detail=""):
        self.step = step
        self.code = code
        text = f"rats-tls {step} failed with error 0x{code & 0xFFFFFFFF:08x}"
        if detail:
            text += f": {detail}"
        super().__init__(text)


class RatsTlsLibraryError(RatsTlsError, StartupError):
    """
    librats_tls.so or its plugin directories are missing or unusable.
    """

    def __init__(self, message):
        self.step = "load"
        self.code = 0
        Exception.__init__(self, message)


class RatsTlsClosed(RatsTlsError):
    """
    A rats-tls connection has ended: the peer closed it, it broke, or its
    session was cleaned up.  rats-tls does not tell these apart.
    """


class HandshakeRefused(EntError):
    """
    A connection's handshake could not be run: the handshake pool is
    stopped, full, or cannot start a thread.  The connection is closed.
    """


class HandshakeTimeout(EntError):
    """
    A handshake did not finish within its budget (C{--handshake-timeout}).
    """


class VsockAddressError(ConfigurationError, ValueError):
    """
    A vsock CID or port is malformed or out of range.

    It is a L{ValueError} too, as Twisted's endpoint string parsers must raise.
    """


class VsockConnectError(EntError, ConnectError):
    """
    A vsock connection could not be made; the message names vsock:CID:PORT.

    C{reason} is the L{ConnectError} of the attempt (refused, timed out, no
    such device, ...), for callers that must tell these apart.
    """

    def __init__(self, address, reason):
        self.address = address
        self.reason = reason
        detail = reason.args[0] if reason.args and reason.args[0] else reason.MESSAGE
        ConnectError.__init__(self, reason.osError, f"cannot connect to {address}: {detail}")

    def __str__(self):
        return self.args[0]
