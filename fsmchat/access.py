"""Who may connect: ``--allow`` and ``--deny`` networks, checked once per accepted connection.

Deny wins over allow; with any allow network, only addresses in one get in. An IPv4 client of a
dual-stack listener arrives as ``::ffff:a.b.c.d`` and is checked as the IPv4 address it is.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_network(text: str) -> Network:
    """``10.0.0.0/8``, ``2001:db8::/32``, or one address (``/32``, ``/128``); ValueError if not."""
    return ipaddress.ip_network(text.strip(), strict=False)


class Access:
    def __init__(self, allow: Sequence[Network] = (), deny: Sequence[Network] = ()) -> None:
        self.allow = tuple(allow)
        self.deny = tuple(deny)
        self.open = not self.allow and not self.deny  # nothing to check

    def permits(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone
        except ValueError:
            return not self.allow  # not an IP socket (a test's socketpair): only allow-lists bar it
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in network for network in self.deny):
            return False
        return not self.allow or any(address in network for network in self.allow)
