"""Which addresses the gateway may connect to for a URL a user supplied, and how to pin them.

Web search fetches pages behind URLs from the open web, and NilRAG calls nilDB nodes at URLs the
client names: either could point inside the operator's network (loopback, a private range, the
cloud metadata service). ``AddressPolicy`` decides which URLs may be used: ``http``/``https``
only, no credentials in the URL, and the host resolved (with the event loop's non-blocking
``getaddrinfo``) to addresses that are **all** public: one loopback, private, link-local,
multicast, reserved, unspecified or metadata address among them refuses the URL, IPv4-mapped,
6to4 and Teredo IPv6 forms included. Networks can be allowlisted for tests
(``allow=["127.0.0.0/8"]``); the metadata addresses stay refused even then. Callers that need a
narrower scheme set (NilRAG: ``https`` only) check the scheme themselves before the policy.

**No DNS rebinding between check and connect.** A name could resolve to a public address when
checked and to ``10.0.0.1`` a moment later, when the HTTP client resolves it again to connect.
So the client never resolves anything: a request is sent to the checked IP address itself
(``pinned_url``: ``http://93.184.215.14/path``), with the ``Host`` header set to the name
(``host_header``), and for https the ``sni_hostname`` extension set to the name
(``pinned_extensions``). httpcore then opens TLS with that name as ``server_hostname``, so SNI
and the certificate check are against the name, as in a normal request; the check and the
connection use the very same address.

The connection pool keys connections by the IP origin, so a TLS connection verified for one
name could be reused for another name at the same address: pinned requests therefore carry
``Connection: close`` and are never reused, over HTTP/1.1 only (httpx's default; with
``http2=True`` the header would not hold).

Refusals carry a short kind (``AddressError``), never the URL or anything fetched.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum

import httpx

_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?")
"""A DNS name (IDNA-encoded): nothing else is handed to the resolver."""

METADATA_ADDRESSES = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)
"""Cloud instance metadata services (AWS, GCP, Azure, and AWS's IPv6 one): never connected to."""

type IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
type IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
type Resolver = Callable[[str, int], Awaitable[list[str]]]
"""``(host, port) -> addresses``: the policy's DNS lookup; tests pass their own."""


class AddressError(StrEnum):
    """Why the policy refused a URL: a short kind, never the URL."""

    BAD_URL = "bad_url"
    FORBIDDEN_ADDRESS = "forbidden_address"
    DNS = "dns"


class Refused(Exception):
    """The address policy refuses a URL; ``kind`` says why (no content)."""

    def __init__(self, kind: AddressError) -> None:
        super().__init__(kind.value)
        self.kind = kind


@dataclass(frozen=True)
class Target:
    """A URL the policy accepted, and the address its connection must go to."""

    url: httpx.URL
    host: str
    """The name as sent in ``Host`` and SNI (IDNA-encoded, lower case, no brackets)."""
    port: int
    address: IPAddress


def parse_url(url: str) -> httpx.URL:
    """``url`` parsed; it must have a host.

    Raises:
        Refused: The URL cannot be parsed, or has no host (``BAD_URL``).
    """
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        raise Refused(AddressError.BAD_URL) from None
    if not parsed.host:
        raise Refused(AddressError.BAD_URL)
    return parsed


async def system_resolver(host: str, port: int) -> list[str]:
    """The host's addresses from the event loop's ``getaddrinfo`` (runs off the loop)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class AddressPolicy:
    """Which URLs may be used, and at which address; see the module docstring."""

    def __init__(self, *, allow: Iterable[str] = (), resolver: Resolver | None = None) -> None:
        """Refuse every non-public address except those in ``allow`` (CIDR networks).

        Args:
            allow: Networks let through although not public, for tests on loopback
                (``["127.0.0.0/8"]``). The metadata addresses are refused regardless.
            resolver: ``(host, port) -> addresses``; the event loop's ``getaddrinfo`` if unset.
        """
        self._allow: list[IPNetwork] = [ipaddress.ip_network(net, strict=False) for net in allow]
        self._resolver: Resolver = resolver or system_resolver

    def address_allowed(self, address: IPAddress) -> bool:
        """Whether a connection to ``address`` is allowed."""
        forms = _forms(address)
        if any(form in METADATA_ADDRESSES for form in forms):
            return False
        if any(form in net for form in forms for net in self._allow):
            return True
        return all(_is_public(form) for form in forms)

    async def check(self, url: str | httpx.URL) -> Target:
        """The target to connect to for ``url``, if every address of its host is allowed.

        The host is resolved once, here; the returned target's ``address`` is the one to
        connect to (``pinned_url``), never resolved again.

        Raises:
            Refused: Not http(s), credentials in the URL, no host, the host does not resolve,
                or one of its addresses is not allowed.
        """
        parsed = url if isinstance(url, httpx.URL) else parse_url(url)
        if parsed.scheme not in {"http", "https"} or not parsed.host:
            raise Refused(AddressError.BAD_URL)
        if parsed.userinfo:
            raise Refused(AddressError.BAD_URL)
        host = parsed.raw_host.decode("ascii").lower()
        if _ip_or_none(host) is None and not _HOST_NAME.fullmatch(host):
            raise Refused(AddressError.BAD_URL)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        addresses = await self._addresses(host, port)
        if not addresses:
            raise Refused(AddressError.DNS)
        if not all(self.address_allowed(address) for address in addresses):
            raise Refused(AddressError.FORBIDDEN_ADDRESS)
        return Target(url=parsed, host=host, port=port, address=addresses[0])

    async def _addresses(self, host: str, port: int) -> list[IPAddress]:
        literal = _ip_or_none(host)
        if literal is not None:
            return [literal]
        try:
            answers = await self._resolver(host, port)
        except (OSError, UnicodeError):
            raise Refused(AddressError.DNS) from None
        addresses: list[IPAddress] = []
        for answer in answers:
            # A scoped IPv6 answer ("fe80::1%eth0") is link-local anyway; the scope is dropped.
            address = _ip_or_none(answer.split("%", 1)[0])
            if address is None:
                raise Refused(AddressError.DNS)
            if address not in addresses:
                addresses.append(address)
        return addresses


def pinned_url(target: Target, url: httpx.URL | None = None) -> httpx.URL:
    """``url`` (the target's own if unset) with its host replaced by the checked address.

    The port is kept and the fragment dropped. ``url`` must be on the target's origin (a path
    below it): only the host is replaced.
    """
    return (url or target.url).copy_with(host=str(target.address), fragment=None)


def host_header(target: Target) -> str:
    """The ``Host`` header for a pinned request: the name, and the port if not the default."""
    default = 443 if target.url.scheme == "https" else 80
    host = f"[{target.host}]" if ":" in target.host else target.host
    return host if target.port == default else f"{host}:{target.port}"


def pinned_extensions(target: Target) -> dict[str, str]:
    """The httpx request extensions for a pinned request (SNI for https).

    TLS then sends SNI for, and verifies the certificate against, the name, not the address
    the pinned URL carries.
    """
    return {"sni_hostname": target.host} if target.url.scheme == "https" else {}


def _ip_or_none(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


def _forms(address: IPAddress) -> list[IPAddress]:
    """The address and the IPv4 address it carries (mapped, 6to4, Teredo), if any."""
    forms: list[IPAddress] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            forms.append(address.ipv4_mapped)
        if address.sixtofour is not None:
            forms.append(address.sixtofour)
        if address.teredo is not None:
            forms.extend(address.teredo)
    return forms


def _is_public(address: IPAddress) -> bool:
    # ``is_global`` alone lets multicast through (224.0.0.0/4 is "global"); the named classes
    # are checked as well so that the rule reads as the issue states it.
    return address.is_global and not (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )
