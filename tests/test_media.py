"""vlmlab.media: every source, every limit, every decode path, and the SSRF guard.

Images are built with Pillow in the test; the network tests run a real ``http.server`` on
127.0.0.1, reached through the policy's ``trusted_hosts`` allowance. Refused addresses must be
refused before any connection, so they need no network.
"""

from __future__ import annotations

import base64
import hashlib
import io
import ipaddress
import os
import shutil
import ssl
import subprocess
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from serverutil import free_port
from vlmlab.media import MediaPolicy, load_image, probe_image
from vlmlab.media_net import domain_allowed, forbidden_reason, parse_ipv4_literal
from vlmlab.protocol.errors import (
    ConfigError,
    ForbiddenMediaError,
    ImageDecodeError,
    ImageTooLargeError,
    MediaFetchError,
    MediaTimeoutError,
)

# --------------------------------------------------------------------------- image builders


def encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def noise_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR (valid CRC) claims ``width x height``, followed by a garbage IDAT:
    any attempt to decode the pixels would fail, so only a header-time refusal passes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", b"\x00garbage")
        + png_chunk(b"IEND", b"")
    )


PNG = encode(noise_rgb(32, 24), "PNG")
JPEG = encode(noise_rgb(64, 48, seed=1), "JPEG", quality=90)


def near(a, b, tol: int = 8) -> bool:
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b, strict=True))


# --------------------------------------------------------------------------- decoding


def test_png_bytes_load_with_sha256_of_source_bytes() -> None:
    data = load_image(PNG)
    assert (data.width, data.height, data.format) == (32, 24, "PNG")
    assert data.image.mode == "RGB" and data.image.size == (32, 24)
    assert data.sha256 == hashlib.sha256(PNG).hexdigest()
    assert data.nbytes == len(PNG)
    assert np.array_equal(np.asarray(data.image), np.asarray(Image.open(io.BytesIO(PNG))))


def test_truncated_jpeg_is_a_decode_error() -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(ImageDecodeError, match="truncated"):
        load_image(JPEG[: len(JPEG) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # we never turn it on


def test_probe_reads_the_header_only() -> None:
    # The truncated JPEG still has an intact header: probing works, loading does not.
    info = probe_image(JPEG[: len(JPEG) // 2])
    assert (info.width, info.height, info.format) == (64, 48, "JPEG")
    assert info.sha256 == hashlib.sha256(JPEG[: len(JPEG) // 2]).hexdigest()


@pytest.mark.parametrize("ref", [b"", "data:image/png;base64,", "   "])
def test_zero_bytes_is_a_clear_error(ref) -> None:
    with pytest.raises(ImageDecodeError, match="empty|zero bytes"):
        load_image(ref)


def test_text_file_named_png_says_text(tmp_path: Path) -> None:
    (tmp_path / "photo.png").write_text("hello, this is not an image\n")
    with pytest.raises(ImageDecodeError, match=r"photo\.png.*found text"):
        load_image(str(tmp_path / "photo.png"), MediaPolicy(allowed_local_root=tmp_path))


def test_huge_png_header_is_refused_before_decoding() -> None:
    bomb = png_header_only(100_000, 100_000)
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError) as info:
        load_image(bomb)
    assert time.perf_counter() - start < 1.0
    assert "pixels" in str(info.value)
    # Under our own (smaller) limit, the refusal names the size and the limit. The IDAT is
    # garbage, so reaching the decoder would have raised ImageDecodeError instead.
    policy = MediaPolicy(max_pixels=1_000_000)
    too_many = r"5000x5000 = 25000000 pixels.*max_pixels=1000000"
    with pytest.raises(ImageTooLargeError, match=too_many):
        load_image(png_header_only(5000, 5000), policy)
    with pytest.raises(ImageTooLargeError):
        probe_image(png_header_only(5000, 5000), policy)
    with pytest.raises(ImageTooLargeError, match="max_side=100"):
        load_image(encode(noise_rgb(101, 10), "PNG"), MediaPolicy(max_side=100))


@pytest.mark.parametrize(
    "ref",
    [
        b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>',
        b'<svg xmlns="http://www.w3.org/2000/svg"><rect width="4" height="4"/></svg>',
        "data:image/svg+xml;base64,"
        + base64.b64encode(b'<svg xmlns="http://www.w3.org/2000/svg"/>').decode(),
        "data:image/svg+xml;utf8,<svg xmlns='http://www.w3.org/2000/svg'/>",
    ],
)
def test_svg_is_refused_with_a_helpful_message(ref) -> None:
    with pytest.raises(ImageDecodeError, match="SVG is not supported; send PNG/JPEG/WebP/GIF"):
        load_image(ref)


def test_cmyk_jpeg_becomes_rgb() -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # no cyan/black, full magenta+yellow
    data = load_image(encode(cmyk, "JPEG", quality=95))
    assert data.image.mode == "RGB"
    assert near(data.image.getpixel((8, 8)), (255, 0, 0), tol=10)


def test_16bit_png_is_scaled_not_clipped() -> None:
    values = np.linspace(0, 65535, 64 * 16).astype(np.uint16).reshape(16, 64)
    src = Image.fromarray(values)
    assert src.mode == "I;16"
    data = load_image(encode(src, "PNG"))
    out = np.asarray(data.image)
    assert data.image.mode == "RGB" and out.shape == (16, 64, 3)
    expected = np.rint(values / 257.0)
    assert np.abs(out[..., 0].astype(int) - expected).max() <= 1
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert out.min() == 0 and out.max() == 255 and 126 <= out[8, 0, 0] <= 130  # ~32800 of 65535


def test_float_tiff_in_0_1_is_scaled_to_0_255() -> None:
    values = np.linspace(0.0, 1.0, 32, dtype=np.float32).reshape(4, 8)
    data = load_image(encode(Image.fromarray(values, "F"), "TIFF"))
    out = np.asarray(data.image)[..., 0]
    assert np.abs(out.astype(int) - np.rint(values * 255)).max() <= 1


def test_exif_orientation_6_swaps_size_and_rotates_pixels() -> None:
    # Stored 40 wide x 20 high: left half red, right half blue. Orientation 6 means "rotate 90
    # degrees clockwise to display", so red ends up on top of a 20 x 40 image.
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    jpeg = encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif)
    data = load_image(jpeg)
    assert (data.width, data.height) == (20, 40) == data.image.size
    expected = np.rot90(stored, k=-1)  # clockwise
    # JPEG rings at the red/blue edge, so compare on average and at points away from it.
    assert np.abs(np.asarray(data.image).astype(int) - expected).mean() < 6
    assert near(data.image.getpixel((10, 5)), (255, 0, 0), 30)
    assert near(data.image.getpixel((10, 35)), (0, 0, 255), 30)
    info = probe_image(jpeg)
    assert (info.width, info.height) == (20, 40)


def test_animated_gif_gives_the_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(gif)).n_frames == 3
    data = load_image(gif)
    assert data.format == "GIF" and data.image.mode == "RGB"
    assert near(data.image.getpixel((4, 4)), (255, 0, 0), 4)


def test_palette_png_with_transparency_is_composited_over_white() -> None:
    im = Image.new("P", (8, 4), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    for x in range(4, 8):
        for y in range(4):
            im.putpixel((x, y), 1)
    data = load_image(encode(im, "PNG", transparency=0))  # palette index 0 (black) transparent
    assert data.image.getpixel((1, 1)) == (255, 255, 255)
    assert data.image.getpixel((6, 1)) == (255, 0, 0)


def test_rgba_and_la_are_composited_over_white() -> None:
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[0, 0] = (0, 0, 255, 0)  # fully transparent blue -> white
    rgba[0, 1] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    rgba[0, 2] = (255, 0, 0, 255)  # opaque red stays red
    out = load_image(encode(Image.fromarray(rgba, "RGBA"), "PNG")).image
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert near(out.getpixel((1, 0)), (127, 127, 127), 2)
    assert out.getpixel((2, 0)) == (255, 0, 0)
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], np.uint8), "LA")
    out = load_image(encode(la, "PNG")).image
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (0, 0, 0)


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB"])
def test_other_modes_become_rgb(mode: str) -> None:
    src = Image.new("RGB", (6, 6), (255, 255, 255)).convert(mode)
    data = load_image(encode(src, "PNG"))
    assert data.image.mode == "RGB" and data.image.getpixel((3, 3)) == (255, 255, 255)


# --------------------------------------------------------------------------- sources


def test_data_url_and_raw_base64() -> None:
    b64 = base64.b64encode(JPEG).decode()
    assert b64.startswith("/9j/")  # looks like an absolute path: must still be base64
    for ref in (f"data:image/jpeg;base64,{b64}", b64, b64[:100] + "\n" + b64[100:]):
        data = load_image(ref)
        assert (data.width, data.height, data.format) == (64, 48, "JPEG")
        assert data.sha256 == hashlib.sha256(JPEG).hexdigest()
    assert "data URL" in load_image(f"data:image/jpeg;base64,{b64}").source


def test_invalid_base64_in_data_url() -> None:
    with pytest.raises(ImageDecodeError, match="not valid base64"):
        load_image("data:image/png;base64,@@@@")


def test_data_url_over_byte_cap_is_refused_and_message_is_short() -> None:
    big = "data:image/png;base64," + base64.b64encode(os.urandom(3_000_000)).decode()
    with pytest.raises(ImageTooLargeError, match="max_bytes=1000") as info:
        load_image(big, MediaPolicy(max_bytes=1000))
    assert len(str(info.value)) < 300
    with pytest.raises(ImageDecodeError) as info:  # random bytes under the cap: not an image
        load_image(big)
    assert len(str(info.value)) < 300


def test_file_under_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # relative paths start from the current directory
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "a.png"
    path.write_bytes(PNG)
    policy = MediaPolicy(allowed_local_root=tmp_path)
    for ref in (str(path), "sub/a.png", path.as_uri()):
        data = load_image(ref, policy)
        assert (data.width, data.height) == (32, 24)
        assert data.sha256 == hashlib.sha256(PNG).hexdigest()
    assert probe_image(str(path), policy).nbytes == len(PNG)
    with pytest.raises(MediaFetchError, match="does not exist"):
        load_image(str(tmp_path / "missing.png"), policy)
    with pytest.raises(MediaFetchError, match="not a regular file"):
        load_image(str(tmp_path / "sub"), policy)
    with pytest.raises(ImageTooLargeError, match="max_bytes=100"):
        load_image(str(path), MediaPolicy(allowed_local_root=tmp_path, max_bytes=100))


def test_file_outside_root_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.chdir(root)
    outside = tmp_path / "secret.png"
    outside.write_bytes(PNG)
    (root / "escape.png").symlink_to(outside)
    (root / "dirlink").symlink_to(tmp_path)
    policy = MediaPolicy(allowed_local_root=root)
    for ref in (
        str(outside),
        str(root / ".." / "secret.png"),
        "../secret.png",
        str(root / "escape.png"),  # symlink inside the root pointing out
        "dirlink/secret.png",  # through a symlinked directory
        outside.as_uri(),
        (root / "escape.png").as_uri(),
    ):
        with pytest.raises(ForbiddenMediaError, match="outside the allowed local root"):
            load_image(ref, policy)


def test_local_files_refused_without_root(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(PNG)
    for ref in ((tmp_path / "a.png").as_uri(), str(tmp_path / "a.png"), "a.png"):
        with pytest.raises(ForbiddenMediaError, match="local files are disabled"):
            load_image(ref)
    with pytest.raises(ForbiddenMediaError, match="NUL byte"):
        load_image("file:///etc/passwd%00.png", MediaPolicy(allowed_local_root=tmp_path))
    with pytest.raises(ForbiddenMediaError, match="remote host"):
        load_image("file://fileserver/share/a.png", MediaPolicy(allowed_local_root=tmp_path))


@pytest.mark.parametrize(
    "ref", ["ftp://example.com/a.png", "gopher://example.com/", "javascript:alert(1)", "dict://x/"]
)
def test_unsupported_schemes_are_refused(ref: str) -> None:
    with pytest.raises(ForbiddenMediaError, match="scheme .* is not supported"):
        load_image(ref)


def test_long_refs_are_truncated_in_messages() -> None:
    with pytest.raises(ForbiddenMediaError) as info:
        load_image("ftp://example.com/" + "a" * 1_000_000)
    assert len(str(info.value)) < 400


def test_policy_validation() -> None:
    with pytest.raises(ConfigError, match="max_bytes"):
        MediaPolicy(max_bytes=0)
    with pytest.raises(ConfigError, match="total_timeout_s"):
        MediaPolicy(total_timeout_s=0)
    with pytest.raises(ConfigError, match="allowed_domains"):
        MediaPolicy(allowed_domains="example.com")  # type: ignore[arg-type]
    policy = MediaPolicy(allowed_domains=frozenset({"Example.COM."}))
    assert policy.allowed_domains == frozenset({"example.com"})


# --------------------------------------------------------------------------- address guard

REFUSED_URLS = [
    "http://127.0.0.1/a.png",
    "https://127.0.0.1/a.png",
    "http://127.0.0.1:8080/a.png",
    "http://2130706433/",  # decimal
    "http://0177.0.0.1/",  # octal
    "http://0x7f.0.0.1/",  # hex
    "http://0x7f000001/",
    "http://017700000001/",
    "http://127.1/",  # short form
    "http://127.0.0.1./",
    "http://0/",  # 0.0.0.0
    "http://0.0.0.0/",
    "http://[::1]/",
    "http://[::]/",
    "http://[::ffff:127.0.0.1]/",  # IPv4-mapped
    "http://[::ffff:7f00:1]/",
    "http://[::ffff:a9fe:a9fe]/",  # mapped 169.254.169.254
    "http://[2002:7f00:1::]/",  # 6to4 of 127.0.0.1
    "http://[2002:a00:1::]/",  # 6to4 of 10.0.0.1
    "http://[64:ff9b::7f00:1]/",  # NAT64 of 127.0.0.1
    "http://[64:ff9b::a9fe:a9fe]/",  # NAT64 of 169.254.169.254
    "http://[::127.0.0.1]/",  # IPv4-compatible
    "http://10.0.0.1/",
    "http://172.16.5.4/",
    "http://192.168.1.1/",
    "http://169.254.169.254/latest/meta-data/",  # AWS/GCP/Azure metadata
    "http://[fd00:ec2::254]/latest/meta-data/",  # AWS IPv6 metadata
    "http://100.100.100.200/latest/meta-data/",  # Alibaba metadata
    "http://168.63.129.16/",  # Azure WireServer (a public-range address)
    "http://192.0.0.192/",  # Oracle legacy metadata
    "http://100.64.0.1/",  # shared CGNAT space
    "http://224.0.0.1/",  # multicast
    "http://[ff02::1]/",
    "http://240.0.0.1/",  # reserved
    "http://255.255.255.255/",
    "http://[fe80::1]/",  # link-local
    "http://[fc00::1]/",  # unique local
    "http://localhost/a.png",
    "http://LOCALHOST./a.png",
    "http://foo.localhost/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://metadata/computeMetadata/v1/",
]


@pytest.mark.parametrize("url", REFUSED_URLS)
def test_private_and_special_addresses_are_refused_before_connecting(url: str) -> None:
    start = time.perf_counter()
    with pytest.raises(ForbiddenMediaError):
        load_image(url, MediaPolicy(connect_timeout_s=0.5, total_timeout_s=1.0))
    assert time.perf_counter() - start < 0.5  # refused by the check, not by a failed connect


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("2130706433", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("0x08080808", "8.8.8.8"),
        ("8.8.8.8.", "8.8.8.8"),
        ("10.1.258", "10.1.1.2"),
        ("example.com", None),
        ("a1b2.example", None),
    ],
)
def test_legacy_ipv4_spellings_parse_like_browsers(host: str, expected: str | None) -> None:
    parsed = parse_ipv4_literal(host)
    assert (str(parsed) if parsed else None) == expected


@pytest.mark.parametrize("host", ["1.2.3.256", "0x1.0x100.0.0", "1.2.3.4.5", "foo.123", "09.1.1.1"])
def test_malformed_numeric_hosts_are_refused(host: str) -> None:
    with pytest.raises(ForbiddenMediaError, match="malformed numeric host"):
        parse_ipv4_literal(host)


def test_public_addresses_pass_the_address_check() -> None:
    for ip in ("8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2002:808:808::1", "::ffff:8.8.8.8"):
        assert forbidden_reason(ipaddress.ip_address(ip)) is None, ip
    assert "loopback" in forbidden_reason(ipaddress.ip_address("::ffff:127.0.0.1"))


def test_domain_allow_list_matches_host_or_subdomain_only() -> None:
    allowed = frozenset({"example.com"})
    assert domain_allowed("example.com", allowed)
    assert domain_allowed("img.cdn.example.com", allowed)
    assert not domain_allowed("notexample.com", allowed)
    assert not domain_allowed("example.com.evil.net", allowed)
    policy = MediaPolicy(allowed_domains=allowed)
    for url in ("http://notexample.com/a.png", "https://example.com.evil.net/a.png"):
        with pytest.raises(ForbiddenMediaError, match="not in the allowed domains: example.com"):
            load_image(url, policy)


def test_credentials_and_odd_characters_in_urls_are_refused() -> None:
    with pytest.raises(ForbiddenMediaError, match="credentials"):
        load_image("http://user:pw@example.com/a.png")
    with pytest.raises(ForbiddenMediaError, match="whitespace, control characters"):
        load_image("http://127.0.0.1\\@example.com/a.png")


# --------------------------------------------------------------------------- a real local server


SEEN_HOSTS: list[str] = []  # Host header of every request the local server received


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self._send(302, b"", {"Location": location})

    def do_GET(self) -> None:  # noqa: C901 - a routing table
        SEEN_HOSTS.append(self.headers.get("Host", ""))
        port = self.server.server_address[1]
        path = self.path
        try:
            if path == "/img.png":
                self._send(200, PNG, {"Content-Type": "image/png"})
            elif path == "/to-img":
                self._redirect("/img.png")
            elif path == "/to-loopback":
                self._redirect(f"http://127.0.0.2:{port}/img.png")
            elif path == "/to-private":
                self._redirect("http://10.0.0.1/img.png")
            elif path == "/to-file":
                self._redirect("file:///etc/passwd")
            elif path == "/loop":
                self._redirect("/loop")
            elif path == "/missing":
                self._send(404, b"not here", {"Content-Type": "text/plain"})
            elif path == "/page":
                self._send(200, b"<!DOCTYPE html><html><body>hi</body></html>", {
                    "Content-Type": "text/html"
                })
            elif path == "/stream-big":
                # No Content-Length: HTTP/1.0, body ends when the connection closes.
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()
                for _ in range(64):
                    self.wfile.write(b"\0" * 65536)
            elif path == "/declared-big":
                self.send_response(200)
                self.send_header("Content-Length", str(10**9))
                self.end_headers()
                self.wfile.write(PNG)
            elif path == "/slow":
                self.send_response(200)
                self.send_header("Content-Length", "100000")
                self.end_headers()
                for _ in range(100):  # a byte every 50 ms: each read succeeds, the total does not
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.05)
            elif path == "/silent":
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.flush()
                time.sleep(3)  # then nothing: only the read timeout can end the wait
            else:
                self._send(404, b"")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, as it should


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a handler still dripping bytes must not block shutdown


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    srv = _Server(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


TRUSTED = MediaPolicy(trusted_hosts=frozenset({"127.0.0.1"}), total_timeout_s=5.0)


def test_fetch_from_trusted_local_server(server: str) -> None:
    data = load_image(f"{server}/img.png", TRUSTED)
    assert (data.width, data.height, data.format) == (32, 24, "PNG")
    assert data.sha256 == hashlib.sha256(PNG).hexdigest()
    assert data.source == f"{server}/img.png"
    # Without the test allowance the very same server is refused: it is on loopback.
    with pytest.raises(ForbiddenMediaError, match="loopback"):
        load_image(f"{server}/img.png")


def test_connects_to_the_vetted_ip_but_keeps_the_host_header(server: str) -> None:
    # "localhost" is resolved and vetted by us; the socket then goes to the vetted IP while the
    # request still carries the original Host header (the DNS-rebinding defence).
    port = server.rsplit(":", 1)[1]
    policy = MediaPolicy(trusted_hosts=frozenset({"localhost"}), total_timeout_s=5.0)
    data = load_image(f"http://localhost:{port}/img.png", policy)
    assert data.sha256 == hashlib.sha256(PNG).hexdigest()
    assert SEEN_HOSTS[-1] == f"localhost:{port}"


def test_redirect_is_followed_and_rechecked(server: str) -> None:
    assert load_image(f"{server}/to-img", TRUSTED).sha256 == hashlib.sha256(PNG).hexdigest()
    with pytest.raises(ForbiddenMediaError, match=r"127\.0\.0\.2.*loopback"):
        load_image(f"{server}/to-loopback", TRUSTED)
    with pytest.raises(ForbiddenMediaError, match=r"10\.0\.0\.1.*private"):
        load_image(f"{server}/to-private", TRUSTED)
    with pytest.raises(ForbiddenMediaError, match="scheme 'file'"):
        load_image(f"{server}/to-file", TRUSTED)
    with pytest.raises(MediaFetchError, match="max_redirects=5"):
        load_image(f"{server}/loop", TRUSTED)


def test_redirects_refused_when_the_policy_says_so(server: str) -> None:
    policy = MediaPolicy(trusted_hosts=frozenset({"127.0.0.1"}), allow_redirects=False)
    with pytest.raises(ForbiddenMediaError, match="redirects are disabled"):
        load_image(f"{server}/to-img", policy)


def test_allow_list_applies_to_trusted_hosts_too(server: str) -> None:
    policy = MediaPolicy(
        trusted_hosts=frozenset({"127.0.0.1"}), allowed_domains=frozenset({"example.com"})
    )
    with pytest.raises(ForbiddenMediaError, match="not in the allowed domains"):
        load_image(f"{server}/img.png", policy)
    ok = MediaPolicy(
        trusted_hosts=frozenset({"127.0.0.1"}), allowed_domains=frozenset({"127.0.0.1"})
    )
    assert load_image(f"{server}/img.png", ok).width == 32


def test_byte_cap_while_streaming_and_from_content_length(server: str) -> None:
    policy = MediaPolicy(trusted_hosts=frozenset({"127.0.0.1"}), max_bytes=200_000)
    with pytest.raises(ImageTooLargeError, match=r"more than max_bytes=200000"):
        load_image(f"{server}/stream-big", policy)
    with pytest.raises(ImageTooLargeError, match=r"Content-Length 1000000000"):
        load_image(f"{server}/declared-big", policy)


def test_slow_server_hits_the_total_timeout(server: str) -> None:
    policy = MediaPolicy(trusted_hosts=frozenset({"127.0.0.1"}), total_timeout_s=0.6)
    start = time.perf_counter()
    with pytest.raises(MediaTimeoutError, match="total_timeout_s=0.6"):
        load_image(f"{server}/slow", policy)
    assert time.perf_counter() - start < 2.0


def test_silent_server_hits_the_read_timeout(server: str) -> None:
    policy = MediaPolicy(trusted_hosts=frozenset({"127.0.0.1"}), read_timeout_s=0.3)
    start = time.perf_counter()
    with pytest.raises(MediaTimeoutError, match=r"/silent timed out \(ReadTimeout"):
        load_image(f"{server}/silent", policy)
    assert time.perf_counter() - start < 2.0


def test_http_error_status_names_url_and_status(server: str) -> None:
    with pytest.raises(MediaFetchError, match=rf"{server}/missing.*HTTP 404"):
        load_image(f"{server}/missing", TRUSTED)


def test_non_image_content_names_the_url(server: str) -> None:
    with pytest.raises(ImageDecodeError, match=rf"{server}/page.*text/html.*found HTML"):
        load_image(f"{server}/page", TRUSTED)


def test_unreachable_port_is_a_fetch_error() -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(MediaFetchError, match=rf"127\.0\.0\.1:{port}/a\.png failed"):
        load_image(f"http://127.0.0.1:{port}/a.png", TRUSTED)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, list[str]]]:
    """An https server with a self-signed 'localhost' certificate that records the SNI names."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    names: list[str] = []
    context.sni_callback = lambda _sock, name, _ctx: names.append(name)
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.socket = context.wrap_socket(srv.socket, server_side=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv.server_address[1], names
    finally:
        srv.shutdown()
        srv.server_close()


def test_https_sends_the_hostname_as_sni_and_verifies_the_certificate(tls_server) -> None:
    # The socket goes to the vetted IP, yet TLS must still present (SNI) and verify the name.
    # The certificate is self-signed, so verification fails: that failure is the proof that the
    # certificate was checked, and the server saw "localhost", not "127.0.0.1", as SNI.
    port, names = tls_server
    policy = MediaPolicy(trusted_hosts=frozenset({"localhost"}), total_timeout_s=5.0)
    with pytest.raises(MediaFetchError, match=rf"https://localhost:{port}/img.png.*certificate"):
        load_image(f"https://localhost:{port}/img.png", policy)
    assert names and names[-1] == "localhost"
