"""The network side of image loading: an SSRF guard and a bounded http(s) fetch.

:func:`fetch_url` downloads an image URL under a :class:`vlmlab.media.MediaPolicy`:

* every host is resolved first and EVERY resolved address (IPv4 and IPv6) is vetted: loopback,
  private, link-local, multicast, unspecified, reserved, shared (CGNAT) and cloud-metadata
  addresses are refused, including IPv4 embedded in IPv6 (``::ffff:127.0.0.1``, 6to4, NAT64,
  Teredo) and the legacy numeric spellings (``2130706433``, ``0177.0.0.1``, ``0x7f.1``, ``127.1``)
  that browsers and ``inet_aton`` accept;
* the connection then goes to the vetted IP itself (the URL's host is replaced by the IP, the
  original ``Host`` header is sent and, for https, the original name is used for SNI and for
  certificate verification through httpcore's ``sni_hostname`` extension), so a DNS answer that
  changes between the check and the connect (DNS rebinding) cannot redirect the request;
* redirects are followed by hand, one hop at a time, and each ``Location`` goes through the same
  checks (or is refused when the policy disables redirects);
* the optional domain allow-list matches the host exactly or as a subdomain;
* connect, per-read and total deadlines apply; the total deadline is checked after every received
  chunk, so a server that drips bytes slowly is cut off. The deadline can be overrun by at most one
  blocking read, itself capped at ``read_timeout_s`` and at the time left;
* the byte cap is checked from ``Content-Length`` before reading and enforced while streaming.

Environment proxies are ignored (``trust_env=False``): a proxy would resolve the name itself and
defeat the address check.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlsplit

import httpx

from vlmlab.protocol.errors import (
    ForbiddenMediaError,
    ImageTooLargeError,
    MediaFetchError,
    MediaTimeoutError,
)

if TYPE_CHECKING:
    from vlmlab.media import MediaPolicy

# The settings a server user changes, named in refusals as the `vlmlab serve` flag and config key
# (`vlmlab chat` / `eval` have no such flags and use the defaults; the text stays true there too).
BYTES_LIMIT_SETTING = "(vlmlab serve --max-image-bytes, config key max_image_bytes)"
TRUSTED_HOSTS_SETTING = (
    "to allow a trusted internal host, list it in vlmlab serve --trusted-media-hosts "
    "(config key trusted_media_hosts)"
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}

# Metadata services that a plain private/link-local test would miss, or that deserve a clear name
# in the refusal message. Sources: AWS IMDS docs (169.254.169.254, IPv6 fd00:ec2::254), AWS ECS
# task metadata (169.254.170.2), Alibaba Cloud ECS metadata (100.100.100.200), Azure WireServer
# (168.63.129.16, a public address), Oracle Cloud legacy metadata (192.0.0.192).
_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",
        "169.254.170.2",
        "fd00:ec2::254",
        "100.100.100.200",
        "168.63.129.16",
        "192.0.0.192",
    )
)
# Names refused before any DNS lookup: metadata endpoints (GCP metadata.google.internal /
# metadata.goog / the search-domain short name "metadata", AWS instance-data) and RFC 6761's
# localhost names, which never leave the machine whatever a resolver says.
_BLOCKED_NAMES = frozenset(
    {"localhost", "metadata", "metadata.google.internal", "metadata.goog", "instance-data"}
)
_NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052
_NAT64_LOCAL_USE = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated ::a.b.c.d (RFC 4291 2.5.5.1)

_HOSTNAME_RE = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)(\.(?!-)[a-z0-9_-]{1,63}(?<!-))*$")
_NUMERIC_LABEL_RE = re.compile(r"^(0[xX][0-9a-fA-F]*|[0-9]+)$")
# Control characters, whitespace and backslashes: parsers disagree on them (WHATWG turns "\" into
# "/"), so a URL carrying them could be vetted as one host and fetched from another.
_BAD_URL_CHARS_RE = re.compile(r"[\x00-\x20\x7f\\]")


def short_ref(text: str, limit: int = 120) -> str:
    """``text`` cut to ``limit`` characters (with the full length noted) for error messages."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...({len(text)} chars)"


def describe_content(data: bytes) -> str:
    """A short human description of bytes PIL could not open ("SVG", "HTML", "text", ...)."""
    head = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n")
    lower = head[:4096].lower()
    if lower.startswith(b"<svg") or (lower.startswith(b"<?xml") and b"<svg" in lower):
        return "SVG"
    if lower.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "HTML"
    if lower.startswith(b"<?xml") or lower.startswith(b"<"):
        return "XML/markup text"
    if head.startswith(b"%PDF"):
        return "PDF"
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftyphevc"):
        return "HEIC/HEIF (not supported)"
    if head.startswith((b"{", b"[")):
        return "text (looks like JSON)"
    try:
        text = head[:512].decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and "\x00" not in text:
        return f"text ({short_ref(text.strip(), 40)!r})"
    return f"unrecognised binary data (starts with {data[:8].hex(' ')})"


def parse_ipv4_literal(host: str) -> ipaddress.IPv4Address | None:
    """Parse a host that is an IPv4 address in any legacy spelling, else return ``None``.

    Follows the WHATWG URL "IPv4 parser" (the forms ``inet_aton`` and browsers accept): 1 to 4
    dot-separated parts, each decimal, octal (leading ``0``) or hex (``0x``); the last part fills
    the remaining bytes, so ``127.1``, ``2130706433``, ``0177.0.0.1`` and ``0x7f.0.0.1`` all mean
    127.0.0.1. A host whose last label is numeric but does not parse (``1.2.3.999``) raises
    :class:`ForbiddenMediaError`, as a browser refuses it, rather than falling through to DNS.
    """
    labels = host.split(".")
    if labels and labels[-1] == "" and len(labels) > 1:
        labels = labels[:-1]  # one trailing dot is allowed
    if not labels or not _NUMERIC_LABEL_RE.match(labels[-1]):
        return None
    numbers: list[int] = []
    for label in labels:
        if not _NUMERIC_LABEL_RE.match(label):
            numbers = []
            break
        if label[:2].lower() == "0x":
            numbers.append(int(label[2:] or "0", 16))
        elif len(label) > 1 and label.startswith("0"):
            if any(c in "89" for c in label):
                numbers = []
                break
            numbers.append(int(label, 8))
        else:
            numbers.append(int(label))
    if not numbers or len(numbers) > 4:
        raise ForbiddenMediaError(f"malformed numeric host {host!r}: not a valid IPv4 address")
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(numbers)):
        raise ForbiddenMediaError(f"malformed numeric host {host!r}: IPv4 part out of range")
    value = last
    for i, n in enumerate(head):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address, bool] | None:
    """The IPv4 address an IPv6 address carries: (form, address, is_pure_translation)."""
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.ipv4_mapped is not None:
        return ("IPv4-mapped IPv6", ip.ipv4_mapped, True)
    if ip in _NAT64_WELL_KNOWN:
        return ("NAT64", low32, True)
    if ip.sixtofour is not None:
        return ("6to4", ip.sixtofour, False)
    if ip.teredo is not None:
        return ("Teredo", ip.teredo[1], False)
    if ip in _IPV4_COMPATIBLE and int(ip) > 1:
        return ("IPv4-compatible IPv6", low32, False)
    return None


def forbidden_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` must not be fetched from ("loopback", "cloud metadata", ...), or ``None``."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return "scoped (zone id) IPv6 address"
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            form, v4, pure_translation = embedded
            reason = forbidden_reason(v4)
            if reason is not None:
                return f"{reason} address {v4} embedded in {form}"
            # IPv4-mapped and well-known NAT64 packets end up at the embedded IPv4 address, so
            # that address alone decides (the IPv6 prefix itself counts as "reserved").
            if pure_translation:
                return None
        if ip in _NAT64_LOCAL_USE:
            return "local-use NAT64"
    if ip in _METADATA_ADDRESSES:
        return "cloud metadata endpoint"
    for attr, reason in (
        ("is_loopback", "loopback"),
        ("is_unspecified", "unspecified"),
        ("is_link_local", "link-local"),
        ("is_multicast", "multicast"),
        ("is_private", "private"),
        ("is_reserved", "reserved"),
    ):
        if getattr(ip, attr):
            return reason
    if not ip.is_global:
        return "non-public (special-purpose or shared) address"
    return None


@dataclass(frozen=True)
class VettedTarget:
    """A URL whose host passed the policy, with the addresses the request may connect to."""

    url: str
    scheme: str
    host: str  # ASCII host as sent in the Host header / SNI (IPv6 without brackets)
    port: int
    path_query: str
    addresses: tuple[IPAddress, ...]

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    def connect_url(self, ip: IPAddress) -> str:
        """The URL with its host replaced by ``ip``: what the socket actually connects to."""
        host = f"[{ip}]" if ip.version == 6 else str(ip)
        return f"{self.scheme}://{host}:{self.port}{self.path_query}"


def domain_allowed(host: str, allowed: frozenset[str]) -> bool:
    """Whether ``host`` equals one of ``allowed`` or is a subdomain of one (not a suffix match)."""
    return any(host == d or host.endswith("." + d) for d in allowed)


def _resolve(host: str, port: int, url: str, deadline: float) -> tuple[IPAddress, ...]:
    """All addresses of ``host`` (IPv4 and IPv6), within the fetch deadline.

    ``getaddrinfo`` has no timeout of its own, so it runs in a daemon thread we stop waiting for.
    """
    found: dict[str, object] = {}

    def lookup() -> None:
        try:
            found["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as e:
            found["error"] = e

    worker = threading.Thread(target=lookup, name="vlmlab-dns", daemon=True)
    worker.start()
    worker.join(max(0.0, deadline - time.monotonic()))
    if worker.is_alive():
        raise MediaTimeoutError(f"resolving {host!r} for {short_ref(url)} timed out")
    if "error" in found:
        raise MediaFetchError(
            f"could not resolve host {host!r} of {short_ref(url)}: {found['error']}"
        ) from found["error"]  # type: ignore[misc]
    addresses: list[IPAddress] = []
    for *_, sockaddr in found["infos"]:  # type: ignore[union-attr]
        ip = ipaddress.ip_address(sockaddr[0].split("%")[0])
        if ip not in addresses:
            addresses.append(ip)
    if not addresses:
        raise MediaFetchError(f"host {host!r} of {short_ref(url)} has no addresses")
    return tuple(addresses)


def vet_url(url: str, policy: MediaPolicy, deadline: float) -> VettedTarget:
    """Check ``url`` against ``policy`` and resolve it; the result says where to connect.

    Raises:
        ForbiddenMediaError: unsupported scheme, credentials in the URL, a host outside the
            allow-list, or any resolved address that is not public (unless the host is trusted).
        MediaFetchError: malformed URL or unresolvable host. MediaTimeoutError: DNS too slow.
    """
    shown = short_ref(url)
    if _BAD_URL_CHARS_RE.search(url):
        raise ForbiddenMediaError(f"URL {shown!r} contains whitespace, control characters or '\\'")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise MediaFetchError(f"malformed URL {shown!r}: {e}") from e
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ForbiddenMediaError(
            f"URL scheme {scheme!r} is not supported for {shown!r}; use http(s)://, a data URL "
            "or a file under the allowed local root"
        )
    if "@" in parts.netloc:
        raise ForbiddenMediaError(f"credentials in image URLs are not accepted: {shown!r}")
    raw_host = parts.hostname or ""
    if not raw_host:
        raise MediaFetchError(f"URL {shown!r} has no host")
    port = port or _DEFAULT_PORTS[scheme]

    literal: IPAddress | None
    if parts.netloc.startswith("["):
        try:
            literal = ipaddress.ip_address(raw_host)
        except ValueError as e:
            raise MediaFetchError(f"malformed IPv6 host in {shown!r}") from e
        if isinstance(literal, ipaddress.IPv6Address) and literal.scope_id:
            raise ForbiddenMediaError(f"scoped IPv6 addresses are refused: {shown!r}")
        host = str(literal)
    else:
        try:
            host = raw_host.encode("idna").decode("ascii").lower().rstrip(".")
        except UnicodeError as e:
            raise MediaFetchError(f"host {raw_host!r} of {shown!r} is not a valid name") from e
        literal = parse_ipv4_literal(host)
        if literal is not None:
            host = str(literal)
        elif not _HOSTNAME_RE.match(host):
            raise MediaFetchError(f"host {raw_host!r} of {shown!r} is not a valid name")

    if policy.allowed_domains is not None and not domain_allowed(host, policy.allowed_domains):
        allowed = ", ".join(sorted(policy.allowed_domains)) or "(none)"
        raise ForbiddenMediaError(
            f"host {host!r} of {shown!r} is not in the allowed domains: {allowed} "
            "(vlmlab serve --allowed-media-domains, config key allowed_media_domains)"
        )
    trusted = host in policy.trusted_hosts or raw_host.lower() in policy.trusted_hosts
    if not trusted and (host in _BLOCKED_NAMES or host.endswith(".localhost")):
        raise ForbiddenMediaError(
            f"host {host!r} of {shown!r} is a local or metadata name; {TRUSTED_HOSTS_SETTING}"
        )

    addresses = (literal,) if literal is not None else _resolve(host, port, url, deadline)
    if not trusted:
        for ip in addresses:
            reason = forbidden_reason(ip)
            if reason is not None:
                raise ForbiddenMediaError(
                    f"refusing to fetch {shown!r}: host {host!r} resolves to {ip}, a {reason} "
                    f"address (only public addresses are allowed; {TRUSTED_HOSTS_SETTING})"
                )
    path_query = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return VettedTarget(url, scheme, host, port, path_query, addresses)


@dataclass(frozen=True)
class FetchedBytes:
    """The body of a successful fetch and what the server said about it."""

    data: bytes
    url: str  # the final URL after redirects
    content_type: str


def _remaining(deadline: float, url: str, policy: MediaPolicy) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise MediaTimeoutError(
            f"fetching {short_ref(url)} took longer than total_timeout_s="
            f"{policy.total_timeout_s:g}"
        )
    return left


def _caused_by_tls(error: BaseException) -> bool:
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _send(
    client: httpx.Client, target: VettedTarget, policy: MediaPolicy, deadline: float
) -> httpx.Response:
    """Open the response for ``target``, trying each vetted address until one connects."""
    last_error: httpx.ConnectError | None = None
    for ip in target.addresses:
        left = _remaining(deadline, target.url, policy)
        timeout = httpx.Timeout(
            min(policy.read_timeout_s, left), connect=min(policy.connect_timeout_s, left)
        )
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else None
        request = client.build_request(
            "GET",
            target.connect_url(ip),
            headers={"Host": target.host_header},
            timeout=timeout,
            extensions=extensions,
        )
        try:
            return client.send(request, stream=True)
        except httpx.ConnectError as e:
            if _caused_by_tls(e):
                raise  # a certificate problem is the same on every address of the host
            last_error = e  # try the next address; the request was never sent
    assert last_error is not None
    raise last_error


def _read_body(response: httpx.Response, url: str, policy: MediaPolicy, deadline: float) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > policy.max_bytes:
        raise ImageTooLargeError(
            f"{short_ref(url)} declares Content-Length {int(declared)} bytes, over the limit "
            f"max_bytes={policy.max_bytes} {BYTES_LIMIT_SETTING}"
        )
    chunks: list[bytes] = []
    received = 0
    # iter_bytes decodes gzip/deflate; a compressed chunk is at most one socket read (64 KiB),
    # so the cap below is overshot by at most one decompressed chunk before it is caught.
    for chunk in response.iter_bytes():
        received += len(chunk)
        if received > policy.max_bytes:
            raise ImageTooLargeError(
                f"{short_ref(url)} sent more than max_bytes={policy.max_bytes} bytes "
                f"(stopped after {received}) {BYTES_LIMIT_SETTING}"
            )
        chunks.append(chunk)
        _remaining(deadline, url, policy)
    return b"".join(chunks)


def fetch_url(url: str, policy: MediaPolicy) -> FetchedBytes:
    """Download ``url`` under ``policy`` (see the module docstring for every check).

    Returns:
        the body bytes, the final URL and the served Content-Type.

    Raises:
        ForbiddenMediaError: a hop is refused by the policy (address, allow-list, redirects off).
        ImageTooLargeError: the body is larger than ``policy.max_bytes``.
        MediaTimeoutError: a connect, read or the total deadline ran out.
        MediaFetchError: unreachable host, HTTP error status, too many redirects.
    """
    deadline = time.monotonic() + policy.total_timeout_s
    current = url
    headers = {"User-Agent": policy.user_agent, "Accept": "image/*"}
    try:
        with httpx.Client(
            trust_env=False, follow_redirects=False, headers=headers, verify=True
        ) as client:
            for hop in range(policy.max_redirects + 1):
                try:
                    target = vet_url(current, policy, deadline)
                except ForbiddenMediaError as e:
                    if hop == 0:
                        raise
                    raise ForbiddenMediaError(
                        f"redirect from {short_ref(url)} refused: {e.message}"
                    ) from e
                response = _send(client, target, policy, deadline)
                try:
                    location = response.headers.get("location")
                    if response.status_code in _REDIRECT_CODES and location:
                        following = urljoin(current, location)
                        if not policy.allow_redirects:
                            raise ForbiddenMediaError(
                                f"{short_ref(current)} redirects (HTTP {response.status_code}) to "
                                f"{short_ref(following)}, and redirects are disabled by the policy"
                            )
                        current = following
                        continue
                    if not 200 <= response.status_code < 300:
                        raise MediaFetchError(
                            f"fetching {short_ref(current)} failed: HTTP {response.status_code} "
                            f"{response.reason_phrase}".rstrip()
                        )
                    body = _read_body(response, current, policy, deadline)
                    content_type = response.headers.get("content-type", "")
                    return FetchedBytes(body, current, content_type)
                finally:
                    response.close()
    except httpx.TimeoutException as e:
        raise MediaTimeoutError(
            f"fetching {short_ref(current)} timed out ({type(e).__name__}; connect_timeout_s="
            f"{policy.connect_timeout_s:g}, read_timeout_s={policy.read_timeout_s:g}, "
            f"total_timeout_s={policy.total_timeout_s:g})"
        ) from e
    except (httpx.HTTPError, httpx.InvalidURL) as e:
        raise MediaFetchError(f"fetching {short_ref(current)} failed: {e}") from e
    raise MediaFetchError(
        f"{short_ref(url)} redirected more than max_redirects={policy.max_redirects} times"
    )
