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


def configureTun(name, address, prefixlen, mtu):
    """
    Give the TUN its address and MTU and bring it up.
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
            ipr.link("set", index=index, mtu=mtu)
            ipr.addr("add", index=index, address=address, prefixlen=prefixlen)
            ipr.link("set", index=index, state="up")
    except NetlinkError as e:
        if e.code == errno.EPERM:
            raise PrivilegeError(f"cannot configure {name}: run as root")
        raise TunError(f"cannot configure {name} ({address}/{prefixlen}, mtu {mtu}): {e}")
