"""Which network interface the expert-parallel collectives use.

Gloo binds to the address the host name resolves to and falls back to loopback when it does not
resolve, and NCCL's bootstrap picks an interface on its own: on hosts with several interfaces
(Kubernetes pods, VMs with a private network, network namespaces) a rank can then advertise an
address its peers cannot reach. Each rank pins both to the interface that carries its Ray node IP,
the address the rest of the cluster already reaches it on.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct

_SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


def interface_for_ip(ip: str) -> str | None:
    """The name of the local interface holding IPv4 address `ip`, or None (Linux only)."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for name in names:
            try:
                raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # interface without an IPv4 address
                continue
            if socket.inet_ntoa(raw[20:24]) == ip:
                return name
    return None


def pin_collective_interface(node_ip: str) -> str | None:
    """Sets GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME to node_ip's interface unless already set.

    Returns the interface name chosen (None when node_ip is on no local interface)."""
    name = interface_for_ip(node_ip)
    if name:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", name)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", name)
    return name
