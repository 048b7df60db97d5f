"""
Write-through for plain stream transports: send now when nothing is queued.

Twisted's C{transport.write} only queues; the bytes leave in C{doWrite} on the
next reactor iteration, after an C{epoll_ctl} for EPOLLOUT and another
C{epoll_wait}. A frame crossing a gateway would wait for that on every leg.
asyncio writes through when its buffer is empty; this does the same for
Twisted's TCP and UNIX connections and leaves every other transport (TLS,
rats-tls, vsock, test doubles) to its own C{write}.

Backpressure is unchanged: what the socket does not take now goes to the
transport's own buffer, which then pauses producers as before; while that
buffer holds anything, writes go behind it, in order.
"""

from twisted.internet.tcp import Connection

# sendmsg takes at most IOV_MAX (1024 on Linux) buffers; more go the usual way.
MAX_BUFFERS = 512


def _direct(transport):
    """
    The socket to send on, if C{transport} is a plain connection with
    nothing queued and not closing; else C{None}.
    """
    if (
        not isinstance(transport, Connection)
        or transport.TLS
        or not transport.connected
        or transport.disconnecting
        or transport._writeDisconnected
        or transport._tempDataBuffer
        or transport.offset != len(transport.dataBuffer)
    ):
        return None
    return transport.socket


def writeThrough(transport, buffers):
    """
    Write the C{bytes} in the list C{buffers} to C{transport}, in order:
    straight to its socket when it holds nothing unsent, the rest (or all,
    on any error, which the reactor then reports as usual) through
    C{writeSequence}.
    """
    sock = _direct(transport)
    if sock is None or len(buffers) > MAX_BUFFERS:
        transport.writeSequence(buffers)
        return
    try:
        if len(buffers) == 1:
            sent = sock.send(buffers[0])
            if sent == len(buffers[0]):
                return
        else:
            sent = sock.sendmsg(buffers)
    except OSError:
        sent = 0
    if not sent:
        transport.writeSequence(buffers)
        return
    for index, buffer in enumerate(buffers):
        size = len(buffer)
        if sent < size:
            rest = [buffer[sent:]] if sent else [buffer]
            transport.writeSequence(rest + buffers[index + 1 :])
            return
        sent -= size
