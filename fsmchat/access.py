"""Who may connect: ``--allow`` and ``--deny`` networks, checked once per accepted connection.

Rules it keeps:
- Deny wins over allow; with any allow network, only addresses in one get in.
- An IPv4 client is matched as IPv4, whether it arrives so or, on a dual-stack listener, as
  ``::ffff:a.b.c.d``; a rule written in the mapped form (``::ffff:10.0.0.1``,
  ``::ffff:0:0/96``) is the IPv4 network it names, so both spellings match both arrivals. An
  IPv6 rule wider than the mapped block (``::/0``) names IPv6 clients only.
- For ``--max-clients-per-addr``, a client counts against its address: an IPv4 address (mapped
  or not), or an IPv6 /64, since one host is commonly given a whole /64 to pick from.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def parse_network(text: str) -> Network:
    """``10.0.0.0/8``, ``2001:db8::/32``, or one address (``/32``, ``/128``); ValueError if not."""
    return ipaddress.ip_network(text.strip(), strict=False)


def _unmapped(network: Network) -> Network:
    """An IPv6 network inside ``::ffff:0:0/96`` as the IPv4 network it maps; others as they are."""
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def _client_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A peer's address as the IP it is (a mapped IPv4 one as IPv4); None if it is no IP."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])  # drop an IPv6 zone
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@functools.lru_cache(maxsize=4096)
def address_key(host: str) -> str:
    """What a client from ``host`` counts against: its IPv4 address, or its IPv6 /64.
    (Remembered: clients come back from the same few addresses, and parsing one is most of
    what taking a connection in costs in Python.)"""
    address = _client_address(host)
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address) if address is not None else host


class Access:
    def __init__(self, allow: Sequence[Network] = (), deny: Sequence[Network] = ()) -> None:
        self.allow = tuple(map(_unmapped, allow))
        self.deny = tuple(map(_unmapped, deny))
        self.open = not self.allow and not self.deny  # nothing to check

    def permits(self, host: str) -> bool:
        address = _client_address(host)
        if address is None:
            return not self.allow  # not an IP socket (a test's socketpair): only allow-lists bar it
        if any(address in network for network in self.deny):
            return False
        return not self.allow or any(address in network for network in self.allow)
