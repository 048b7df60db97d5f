"""
The TUN device's address, MTU and link state, set with pyroute2 in the
child process of L{ent.hostconfig.steps} (the agent never loads pyroute2).
"""

import errno

from ent.errors import PrivilegeError, TunError


def _disableIpv6(name):
    """
    The tunnel carries IPv4; without this the kernel would send IPv6
    router solicitations and MLD reports through it.
    """
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
            f.write("1")
    except OSError:
        pass  # IPv6 is off in this kernel or namespace already


def _strictReversePath(name):
    """
    Strict reverse-path filtering on the TUN: the kernel drops what arrives
    from the tunnel from a source it would not route back into it.  The
    kernel applies the larger of conf.all and conf.<tun>, so a host with
    conf.all.rp_filter=2 (loose) stays loose; the agent's table checks the
    same in nftables whatever the host says.  The setting goes with the TUN.
    """
    path = f"/proc/sys/net/ipv4/conf/{name}/rp_filter"
    try:
        with open(path, "w") as f:
            f.write("1")
    except OSError as e:
        raise TunError(f"cannot configure {name}: {path}: {e.strerror}")


def configureTun(name, address, prefixlen, mtu):
    """
    Give the TUN its address and MTU, strict reverse-path filtering, and
    bring it up.
    """
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    _disableIpv6(name)
    try:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=name)
            if not found:
                raise TunError(f"cannot configure {name}: no such interface")
            (index,) = found
            _strictReversePath(name)
            ipr.link("set", index=index, mtu=mtu)
            ipr.addr("add", index=index, address=address, prefixlen=prefixlen)
            ipr.link("set", index=index, state="up")
    except NetlinkError as e:
        if e.code == errno.EPERM:
            raise PrivilegeError(f"cannot configure {name}: run as root")
        raise TunError(f"cannot configure {name} ({address}/{prefixlen}, mtu {mtu}): {e}")
