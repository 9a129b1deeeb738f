"""The address policy shared by web search and NilRAG (nilai.context.addresses).

DNS names are answered by a test resolver, never by real DNS (except "localhost", from
/etc/hosts). How pinned requests reach the stand-ins is tested with the page fetcher
(tests/unit/context/search/test_pages.py) and the NilRAG node client
(tests/unit/context/rag/test_nodes.py).
"""

from __future__ import annotations

import ipaddress

import httpx
import pytest

from nilai.context.addresses import (
    AddressError,
    AddressPolicy,
    Refused,
    Target,
    host_header,
    parse_url,
    pinned_extensions,
    pinned_url,
)


class Answers:
    """A resolver answering from a table; any other name does not resolve. Records the asks."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        if host not in self.answers:
            raise OSError("name does not resolve")
        return self.answers[host]


def resolver_of(answers: dict[str, list[str]]) -> Answers:
    return Answers(answers)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",  # loopback
        "127.8.9.10",
        "10.0.0.1",  # private
        "172.16.5.4",
        "192.168.1.1",
        "100.64.0.1",  # carrier-grade NAT (shared)
        "169.254.1.1",  # link-local
        "169.254.169.254",  # metadata
        "224.0.0.1",  # multicast
        "239.255.255.250",
        "240.0.0.1",  # reserved
        "255.255.255.255",
        "0.0.0.0",  # unspecified
        "::1",  # IPv6 loopback
        "::",  # IPv6 unspecified
        "fe80::1",  # IPv6 link-local
        "fc00::1",  # IPv6 unique local
        "fd00:ec2::254",  # AWS IPv6 metadata
        "ff02::1",  # IPv6 multicast
        "::ffff:127.0.0.1",  # IPv4-mapped loopback
        "::ffff:10.0.0.1",  # IPv4-mapped private
        "::ffff:169.254.169.254",  # IPv4-mapped metadata
        "2002:a00:1::",  # 6to4 carrying 10.0.0.1
        "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
    ],
)
def test_non_public_addresses_are_refused(address: str):
    policy = AddressPolicy()
    assert not policy.address_allowed(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.215.14", "8.8.8.8", "2606:4700::1111"])
def test_public_addresses_are_allowed(address: str):
    assert AddressPolicy().address_allowed(ipaddress.ip_address(address))


def test_the_allowlist_lets_its_networks_through_but_never_metadata():
    policy = AddressPolicy(allow=["127.0.0.0/8", "169.254.0.0/16", "fd00::/8"])
    assert policy.address_allowed(ipaddress.ip_address("127.0.0.1"))
    assert policy.address_allowed(ipaddress.ip_address("::ffff:127.0.0.1"))
    assert policy.address_allowed(ipaddress.ip_address("169.254.1.1"))
    assert not policy.address_allowed(ipaddress.ip_address("169.254.169.254"))
    assert not policy.address_allowed(ipaddress.ip_address("fd00:ec2::254"))
    assert not policy.address_allowed(ipaddress.ip_address("10.0.0.1"))


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/file",
        "file:///etc/passwd",
        "gopher://example.com/",
        "javascript:alert(1)",
        "http://user:pass@example.com/",
        "https://user@example.com/",
        "http:///nohost",
        "not a url",
    ],
)
async def test_bad_urls_are_refused(url: str):
    policy = AddressPolicy(resolver=resolver_of({"example.com": ["93.184.215.14"]}))
    with pytest.raises(Refused) as refused:
        await policy.check(url)
    assert refused.value.kind is AddressError.BAD_URL


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://[::1]/",
        "http://[::ffff:169.254.169.254]/",
        "http://169.254.169.254/latest/meta-data/",
        "https://10.0.0.1:8443/",
        "http://internal.test/",
    ],
)
async def test_forbidden_addresses_are_refused_after_resolution(url: str):
    policy = AddressPolicy(resolver=resolver_of({"internal.test": ["10.1.2.3"]}))
    with pytest.raises(Refused) as refused:
        await policy.check(url)
    assert refused.value.kind is AddressError.FORBIDDEN_ADDRESS


async def test_one_forbidden_address_among_public_ones_refuses_the_name():
    policy = AddressPolicy(
        resolver=resolver_of({"mixed.test": ["93.184.215.14", "2606:4700::1111", "127.0.0.1"]})
    )
    with pytest.raises(Refused) as refused:
        await policy.check("https://mixed.test/")
    assert refused.value.kind is AddressError.FORBIDDEN_ADDRESS


async def test_a_public_name_gives_its_checked_address_and_the_name_for_host_and_sni():
    policy = AddressPolicy(resolver=resolver_of({"news.example": ["93.184.215.14", "8.8.8.8"]}))
    target = await policy.check("HTTPS://News.Example:8443/a?b=1")
    assert target.host == "news.example"
    assert target.port == 8443
    assert target.address == ipaddress.ip_address("93.184.215.14")


async def test_a_name_that_does_not_resolve_is_refused_as_dns():
    policy = AddressPolicy(resolver=resolver_of({}))
    with pytest.raises(Refused) as refused:
        await policy.check("http://nowhere.test/")
    assert refused.value.kind is AddressError.DNS


async def test_the_system_resolver_runs_on_the_event_loop():
    # "localhost" resolves from /etc/hosts, no network; loopback is refused without allowlist.
    with pytest.raises(Refused) as refused:
        await AddressPolicy().check("http://localhost/")
    assert refused.value.kind is AddressError.FORBIDDEN_ADDRESS
    target = await AddressPolicy(allow=["127.0.0.0/8", "::1/128"]).check("http://localhost/")
    assert target.address.is_loopback


async def test_a_name_is_resolved_once_per_check_and_the_first_address_is_pinned():
    resolve = resolver_of({"node.example": ["93.184.215.14", "2606:4700::1111"]})
    policy = AddressPolicy(resolver=resolve)
    target = await policy.check("https://node.example/api/v1")
    assert resolve.asked == ["node.example"]
    assert target.address == ipaddress.ip_address("93.184.215.14")
    path = target.url.copy_with(path="/api/v1/queries/execute")
    assert str(pinned_url(target, path)) == "https://93.184.215.14/api/v1/queries/execute"
    assert str(pinned_url(target)) == "https://93.184.215.14/api/v1"
    # Building pinned requests asks nothing more of the resolver.
    assert resolve.asked == ["node.example"]


async def test_an_ip_literal_is_not_resolved():
    resolve = resolver_of({})
    target = await AddressPolicy(resolver=resolve).check("https://93.184.215.14:8443/x")
    assert resolve.asked == []
    assert target.address == ipaddress.ip_address("93.184.215.14")
    assert target.port == 8443


@pytest.mark.parametrize(
    ("url", "host", "sni"),
    [
        ("https://node.example/api/v1", "node.example", {"sni_hostname": "node.example"}),
        ("https://node.example:8443/api", "node.example:8443", {"sni_hostname": "node.example"}),
        ("http://node.example/api", "node.example", {}),
        ("http://node.example:8080/api", "node.example:8080", {}),
    ],
)
async def test_host_header_and_sni_name_the_host_not_the_address(
    url: str, host: str, sni: dict[str, str]
):
    policy = AddressPolicy(resolver=resolver_of({"node.example": ["93.184.215.14"]}))
    target = await policy.check(url)
    assert host_header(target) == host
    assert pinned_extensions(target) == sni
    assert pinned_url(target).host == "93.184.215.14"


def test_an_ipv6_target_is_bracketed_in_host_and_url():
    target = Target(
        url=httpx.URL("https://[2606:4700::1111]:8443/api"),
        host="2606:4700::1111",
        port=8443,
        address=ipaddress.ip_address("2606:4700::1111"),
    )
    assert host_header(target) == "[2606:4700::1111]:8443"
    assert str(pinned_url(target)) == "https://[2606:4700::1111]:8443/api"


@pytest.mark.parametrize("url", ["", "not a url", "http:///nohost", "https://"])
def test_unparseable_urls_are_bad_urls(url: str):
    with pytest.raises(Refused) as refused:
        parse_url(url)
    assert refused.value.kind is AddressError.BAD_URL
    assert str(refused.value) == "bad_url"


def test_the_policy_and_its_helpers_are_still_importable_from_the_page_fetcher():
    from nilai.context.search import pages

    assert pages.AddressPolicy is AddressPolicy
    assert pages.Refused is Refused
