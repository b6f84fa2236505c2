"""Who a caller is: its API key (hashed), else its network address.

`X-Forwarded-For` is believed only when the direct peer is one of `trusted_proxies` (addresses or CIDRs); then the
chain is read from the right, skipping trusted hops, and the first untrusted address is the client. Anything a
client writes further left is its own claim and ignored, so a client cannot pick another's identity.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Mapping
from functools import lru_cache

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
KEY_PREFIX_CHARS = 16  # hex characters of the key's sha256 kept: 64 bits, unique among any realistic set of keys


def client_id(headers: Mapping[str, str], peer: str | None, trusted_proxies: list[str]) -> str:
    """`key:<sha256 prefix>` of the X-API-Key header, else `ip:<address>` (see the module doc), else `ip:unknown`."""
    key = header(headers, "x-api-key")
    if key:
        return "key:" + hashlib.sha256(key.encode()).hexdigest()[:KEY_PREFIX_CHARS]
    return forwarded_client(peer, header(headers, "x-forwarded-for"), tuple(trusted_proxies))


@lru_cache(maxsize=4096)
def forwarded_client(peer: str | None, forwarded: str | None, trusted_proxies: tuple[str, ...]) -> str:
    """`ip:<client>` from the direct peer and the X-Forwarded-For chain (cached: a client sends the same pair)."""
    nets = networks(trusted_proxies)
    client = address(peer)
    if client is not None and forwarded and trusted(client, nets):
        for hop in reversed(forwarded.split(",")):
            a = address(hop)
            if a is None:
                break  # a malformed hop: trust nothing to its left
            client = a
            if not trusted(a, nets):
                break
    return f"ip:{client}" if client is not None else "ip:unknown"


def header(headers: Mapping[str, str], name: str) -> str | None:
    """A header's value, its name matched case-insensitively (plain dicts as well as Starlette's Headers)."""
    value = headers.get(name)
    if value is None:
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    return value.strip() if value is not None else None


def address(text: str | None) -> Address | None:
    """An IP address (an IPv4-mapped IPv6 address as its IPv4 form), or None when `text` is not one."""
    if not text:
        return None
    try:
        a = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    mapped = getattr(a, "ipv4_mapped", None)
    return mapped or a


@lru_cache(maxsize=32)
def networks(entries: tuple[str, ...]) -> tuple[Network, ...]:
    """The trusted proxies as networks (an address is a /32 or /128); parsed once per list."""
    return tuple(ipaddress.ip_network(e.strip(), strict=False) for e in entries if e.strip())


def trusted(a: Address, nets: tuple[Network, ...]) -> bool:
    return any(a.version == n.version and a in n for n in nets)
