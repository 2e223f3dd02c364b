"""Image loading for every entry point (server, CLI, eval): sources, limits and decoding.

:func:`load_image` turns what a user sent into an RGB image plus facts about its bytes
(:class:`~vlmlab.protocol.core.ImageData`); :func:`probe_image` reads only the header
(:class:`ImageInfo`), for planning. Both apply one :class:`MediaPolicy`:

* sources: ``data:`` URLs, raw base64, raw ``bytes``, ``file://`` URLs and paths (only under
  ``allowed_local_root``; refused when none is set), and ``http(s)://`` URLs fetched through the
  SSRF guard in :mod:`vlmlab.media_net`. Every other scheme is refused.
* limits: ``max_bytes`` on the source bytes, ``max_pixels`` (and ``max_side``) checked from the
  header before any pixel is decoded, so decompression bombs never allocate their raster.
  :func:`plan_decode` reads the same header to say what decoding will allocate (for admission
  against a memory budget) and plans JPEGs at a reduced DCT scale (``Image.draft``) where that
  fits the caps or serves the caller as well; :func:`decode_image` follows the plan.
* decoding: raster formats only (PNG, JPEG, GIF, WebP, BMP, TIFF, AVIF where Pillow has it; SVG,
  text, HTML, PDF are refused saying what was found); first frame of animations; EXIF orientation
  applied; every mode converted to RGB with transparency composited over white; truncated files
  are errors (``ImageFile.LOAD_TRUNCATED_IMAGES`` is deliberately left off).

Every failure is a :class:`~vlmlab.protocol.errors.MediaError` subclass naming the source and the
value found, with the PIL/httpx exception chained; references are shortened in messages so a
multi-MB data URL is never echoed back.
"""

from __future__ import annotations

import binascii
import hashlib
import io
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, unquote_to_bytes, urlsplit

import pybase64
from PIL import Image, ImageOps, UnidentifiedImageError

from vlmlab.media_net import BYTES_LIMIT_SETTING, describe_content, fetch_url, short_ref
from vlmlab.protocol.core import ImageData
from vlmlab.protocol.errors import (
    ConfigError,
    ForbiddenMediaError,
    ImageDecodeError,
    ImageTooLargeError,
    MediaError,
    MediaFetchError,
    VlmlabError,
)

__all__ = [
    "DecodePlan",
    "ImageBytes",
    "ImageInfo",
    "MediaPolicy",
    "decode_image",
    "load_image",
    "plan_decode",
    "probe_image",
    "read_image_bytes",
]

# vLLM's default for VLLM_MAX_IMAGE_PIXELS (vllm/envs.py, enforced in vllm/multimodal/image.py):
# twice PIL's Image.MAX_IMAGE_PIXELS (89_478_485), i.e. the point where PIL itself raises
# DecompressionBombError; about 537 MB as an RGB raster.
DEFAULT_MAX_PIXELS = 178_956_970
DEFAULT_MAX_BYTES = 20 * 1024 * 1024

_WANTED_FORMATS = ("PNG", "JPEG", "MPO", "GIF", "WEBP", "BMP", "TIFF", "AVIF")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")  # 2+ letters: "C:\x.png" stays a path
_BASE64_RE = re.compile(r"[A-Za-z0-9+/]+={0,2}")
# Raw base64 shorter than this is taken as a path: the smallest real image (a 1x1 PNG) is ~92
# base64 characters, while short extension-less strings like "/srv/img" are valid base64 too.
_MIN_RAW_BASE64 = 64
PIXELS_LIMIT_SETTING = "(vlmlab serve --max-image-pixels, config key max_image_pixels)"
_ROTATING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width/height
# libjpeg decodes at 1/1, 1/2, 1/4 or 1/8 scale in the DCT domain (PIL's Image.draft).
_JPEG_SCALES = (1, 2, 4, 8)
# Bytes per pixel of a PIL image in memory, by mode (Pillow's Storage.c: 1-byte modes keep one
# byte per pixel, "1" included; 2- and 3-channel modes such as LA and RGB are padded to 4).
_PIL_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_RGB_PIXEL_BYTES = 4  # the RGB image decoding returns is stored as RGBX


@dataclass(frozen=True)
class MediaPolicy:
    """What :func:`load_image` may read and how much; the defaults suit a public server.

    Attributes:
        allowed_local_root: directory that ``file://`` URLs and paths must resolve into (after
            following symlinks and ``..``; relative paths start from the current directory, as
            everywhere else). ``None`` refuses every local file.
        allowed_domains: ``None`` allows any public host; otherwise only hosts equal to, or
            subdomains of, one of these names (an empty set refuses every URL).
        trusted_hosts: host names or IP literals (as written in the URL) whose addresses skip
            the private-address check. Exists for tests against local servers and for trusted
            internal hosts only: never put user-controlled names here.
        allow_redirects: follow HTTP redirects (each hop re-checked); ``False`` refuses them.
        max_redirects: most redirect hops followed before giving up.
        connect_timeout_s: limit on each TCP/TLS connect.
        read_timeout_s: longest silence allowed while waiting for response bytes.
        total_timeout_s: deadline for the whole fetch: DNS, every hop, and the full body.
        max_bytes: cap on the source bytes (download, file, decoded base64).
        max_pixels: cap on width * height, checked from the header before decoding.
        max_side: optional cap on the longer side, in pixels.
        user_agent: User-Agent header sent with http(s) requests.
    """

    allowed_local_root: Path | None = None
    allowed_domains: frozenset[str] | None = None
    trusted_hosts: frozenset[str] = field(default_factory=frozenset)
    allow_redirects: bool = True
    max_redirects: int = 5
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    total_timeout_s: float = 30.0
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_side: int | None = None
    user_agent: str = "vlmlab"

    def __post_init__(self) -> None:
        # Normalise here so the guard can compare plain lowercase names without trailing dots.
        if self.allowed_local_root is not None:
            object.__setattr__(self, "allowed_local_root", Path(self.allowed_local_root))
        if self.allowed_domains is not None:
            if isinstance(self.allowed_domains, str):
                raise ConfigError("allowed_domains must be a set of names, not one string")
            names = frozenset(d.strip().strip(".").lower() for d in self.allowed_domains)
            object.__setattr__(self, "allowed_domains", names)
        if isinstance(self.trusted_hosts, str):
            raise ConfigError("trusted_hosts must be a set of names, not one string")
        hosts = frozenset(h.strip().strip("[]").rstrip(".").lower() for h in self.trusted_hosts)
        object.__setattr__(self, "trusted_hosts", hosts)
        for name in ("connect_timeout_s", "read_timeout_s", "total_timeout_s"):
            if not getattr(self, name) > 0:  # also refuses NaN
                raise ConfigError(f"MediaPolicy.{name} must be positive, got {getattr(self, name)}")
        for name in ("max_bytes", "max_pixels"):
            if getattr(self, name) < 1:
                value = getattr(self, name)
                raise ConfigError(
                    f"image {name} must be at least 1, got {value} "
                    "(vlmlab serve --max-image-bytes / --max-image-pixels)"
                )
        if self.max_redirects < 0:
            raise ConfigError(f"MediaPolicy.max_redirects must be >= 0, got {self.max_redirects}")
        if self.max_side is not None and self.max_side < 1:
            raise ConfigError(f"MediaPolicy.max_side must be at least 1, got {self.max_side}")


@dataclass(frozen=True)
class ImageInfo:
    """What :func:`probe_image` learns from an image's header, without decoding its pixels.

    Attributes:
        width, height: size after EXIF orientation (as :func:`load_image` would report it).
        format: the container format PIL detected ("JPEG", "PNG", ...).
        nbytes: size of the source bytes. sha256: hex digest of the source bytes.
        source: short description of where the bytes came from.
    """

    width: int
    height: int
    format: str
    nbytes: int
    sha256: str
    source: str = ""


@dataclass(frozen=True)
class _Source:
    data: bytes
    source: str  # for messages and ImageData.source
    content_type: str = ""  # what an http server said it sent, for messages


# --------------------------------------------------------------------------- sources


def _decode_base64(text: str, source: str, policy: MediaPolicy) -> bytes:
    if len(text) * 3 // 4 <= policy.max_bytes:
        # Fast path: plain standard base64, as clients send it (SIMD decoder, strict).
        try:
            return pybase64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except (binascii.Error, ValueError):
            pass  # whitespace, the URL-safe alphabet or junk: normalise, then decide below
    compact = "".join(text.split())
    # Check the size the payload will decode to before allocating it.
    if len(compact) * 3 // 4 > policy.max_bytes + 2:
        raise ImageTooLargeError(
            f"{source} decodes to about {len(compact) * 3 // 4} bytes, over the limit "
            f"max_bytes={policy.max_bytes} {BYTES_LIMIT_SETTING}"
        )
    compact = compact.replace("-", "+").replace("_", "/")  # accept the URL-safe alphabet too
    compact += "=" * (-len(compact) % 4)
    try:
        return pybase64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageDecodeError(f"{source} is not valid base64: {e}") from e


def _read_data_url(ref: str, policy: MediaPolicy) -> _Source:
    header, sep, payload = ref.partition(",")
    if not sep:
        raise ImageDecodeError(f"malformed data URL {short_ref(ref, 60)!r}: no ',' before the data")
    params = header[len("data:") :].split(";")
    media_type = params[0].strip().lower() or "text/plain"
    source = f"data URL ({media_type})"
    if media_type.startswith("image/svg"):
        raise ImageDecodeError(f"{source}: SVG is not supported; send PNG/JPEG/WebP/GIF")
    if "base64" in (p.strip().lower() for p in params[1:]):
        return _Source(_decode_base64(payload, source, policy), source, media_type)
    if len(payload) > 3 * policy.max_bytes:  # percent-encoding is at most 3 chars per byte
        raise ImageTooLargeError(
            f"{source} is over the limit max_bytes={policy.max_bytes} {BYTES_LIMIT_SETTING}"
        )
    data = unquote_to_bytes(payload)
    return _Source(data, source, media_type)


def _read_local(path_text: str, shown: str, policy: MediaPolicy) -> _Source:
    """Read a file that must resolve (symlinks and ``..`` followed) inside the allowed root."""
    root = policy.allowed_local_root
    if root is None:
        raise ForbiddenMediaError(
            f"local files are disabled, refusing {shown!r}: to read images from disk, set the "
            "directory they may come from (vlmlab serve --allowed-local-media-path DIR, config "
            "key allowed_local_media_path)"
        )
    if "\x00" in path_text:
        raise ForbiddenMediaError(f"image path {shown!r} contains a NUL byte")
    real_root = os.path.realpath(root)
    real = os.path.realpath(path_text)
    if os.path.commonpath([real, real_root]) != real_root:
        raise ForbiddenMediaError(
            f"{shown!r} resolves outside the allowed local root {str(root)!r}; "
            "only files under that directory may be read (vlmlab serve "
            "--allowed-local-media-path, config key allowed_local_media_path)"
        )
    # Residual risk: a symlink created inside the root between realpath() and open() could still
    # redirect the open; O_NOFOLLOW covers the last component, intermediate directories are not.
    # O_NONBLOCK keeps a FIFO from hanging the open; the S_ISREG check then refuses it.
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(real, flags)
    except FileNotFoundError as e:
        raise MediaFetchError(f"image file {shown!r} does not exist") from e
    except OSError as e:
        raise MediaFetchError(f"cannot open image file {shown!r}: {e.strerror}") from e
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise MediaFetchError(f"{shown!r} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        if info.st_size > policy.max_bytes:
            raise ImageTooLargeError(
                f"image file {shown!r} is {info.st_size} bytes, over the limit "
                f"max_bytes={policy.max_bytes} {BYTES_LIMIT_SETTING}"
            )
        data = f.read(policy.max_bytes + 1)  # the file may have grown since fstat
    if len(data) > policy.max_bytes:
        raise ImageTooLargeError(
            f"image file {shown!r} is over max_bytes={policy.max_bytes} {BYTES_LIMIT_SETTING}"
        )
    return _Source(data, real)


def _read_source(ref: str | bytes | bytearray | memoryview, policy: MediaPolicy) -> _Source:
    """Fetch the raw bytes ``ref`` points to, applying the policy's source rules and byte cap."""
    if isinstance(ref, (bytes, bytearray, memoryview)):
        data = bytes(ref)
        if len(data) > policy.max_bytes:
            raise ImageTooLargeError(
                f"image bytes are {len(data)} bytes, over the limit max_bytes={policy.max_bytes}"
                f" {BYTES_LIMIT_SETTING}"
            )
        return _Source(data, "bytes")
    if not isinstance(ref, str):
        raise MediaError(f"an image reference must be a string or bytes, got {type(ref).__name__}")
    ref = ref.strip()
    if not ref:
        raise ImageDecodeError("the image reference is empty (zero bytes)")
    shown = short_ref(ref, 80)
    scheme_match = _SCHEME_RE.match(ref)
    if scheme_match:
        scheme = scheme_match.group(1).lower()
        if scheme == "data":
            return _read_data_url(ref, policy)
        if scheme in ("http", "https"):
            fetched = fetch_url(ref, policy)
            return _Source(fetched.data, short_ref(fetched.url), fetched.content_type)
        if scheme == "file":
            parts = urlsplit(ref)
            if parts.netloc not in ("", "localhost"):
                raise ForbiddenMediaError(f"file URL {shown!r} names a remote host; refused")
            return _read_local(unquote(parts.path), shown, policy)
        raise ForbiddenMediaError(
            f"URL scheme {scheme!r} is not supported ({shown!r}); use http(s)://, a data: URL, "
            "raw base64, or a file under the allowed local root"
        )
    compact = "".join(ref.split())
    if len(compact) >= _MIN_RAW_BASE64 and _BASE64_RE.fullmatch(compact):
        return _Source(_decode_base64(compact, "raw base64 data", policy), "base64 data")
    return _read_local(ref, shown, policy)


# --------------------------------------------------------------------------- decoding


def _raster_formats() -> tuple[str, ...]:
    # Restricting Image.open to raster plugins keeps e.g. EPS (which runs Ghostscript) and the
    # exotic scientific formats away from untrusted bytes.
    Image.init()
    return tuple(f for f in _WANTED_FORMATS if f in Image.OPEN)


def _check_size(source: str, width: int, height: int, policy: MediaPolicy) -> None:
    if width * height > policy.max_pixels:
        raise ImageTooLargeError(
            f"{source} is {width}x{height} = {width * height} pixels, over the limit "
            f"max_pixels={policy.max_pixels} {PIXELS_LIMIT_SETTING}; downscale it before sending"
        )
    if policy.max_side is not None and max(width, height) > policy.max_side:
        raise ImageTooLargeError(
            f"{source} is {width}x{height}, its longer side is over max_side={policy.max_side}"
        )


def _draftable(im: Image.Image) -> bool:
    """Whether PIL can decode ``im`` at a reduced DCT scale (baseline/progressive JPEG)."""
    return im.format in ("JPEG", "MPO") and len(getattr(im, "tile", ())) == 1


def _scaled(width: int, height: int, scale: int) -> tuple[int, int]:
    """The size libjpeg gives at 1/``scale`` (rounded up, as PIL's JpegImageFile.draft)."""
    return -(-width // scale), -(-height // scale)


def _cap_scale(im: Image.Image, policy: MediaPolicy) -> int | None:
    """The smallest DCT scale (1 for any format within the caps) at which ``im`` fits the
    pixel caps, or ``None``."""
    for scale in _JPEG_SCALES if _draftable(im) else (1,):
        width, height = _scaled(*im.size, scale)
        side_ok = policy.max_side is None or max(width, height) <= policy.max_side
        if side_ok and width * height <= policy.max_pixels:
            return scale
    return None


def _open_checked(src: _Source, policy: MediaPolicy, *, reducible: bool = False) -> Image.Image:
    """Open the header, refuse non-images and oversize images; no pixel is decoded yet.

    ``reducible``: let a JPEG over the pixel caps through when a reduced (1/2..1/8) decode of it
    fits them; the caller must then decode it at that scale (see :func:`plan_decode`)."""
    data = src.data
    if not data:
        raise ImageDecodeError(f"{src.source} is empty (zero bytes); send a PNG/JPEG/WebP/GIF")
    if len(data) > policy.max_bytes:
        raise ImageTooLargeError(
            f"{src.source} is {len(data)} bytes, over the limit max_bytes={policy.max_bytes}"
            f" {BYTES_LIMIT_SETTING}"
        )
    served = f" (served as {src.content_type})" if src.content_type else ""
    try:
        im = Image.open(io.BytesIO(data), formats=_raster_formats())
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # PIL's own bomb check runs inside Image.open (the Warning only arrives as an exception
        # when a warnings filter turns it into one); both mean "too many pixels".
        raise ImageTooLargeError(
            f"{src.source} is refused as too large by Pillow's decompression-bomb check "
            f"({e}); max_pixels={policy.max_pixels} {PIXELS_LIMIT_SETTING}"
        ) from e
    except UnidentifiedImageError as e:
        found = describe_content(data)
        if found == "SVG":
            raise ImageDecodeError(
                f"{src.source}{served}: SVG is not supported; send PNG/JPEG/WebP/GIF"
            ) from e
        raise ImageDecodeError(
            f"{src.source}{served} is not a supported image: found {found}; "
            "send PNG/JPEG/WebP/GIF"
        ) from e
    except Exception as e:  # PIL raises many types (SyntaxError, struct.error, ...) on bad headers
        raise ImageDecodeError(f"{src.source}{served} has a corrupt image header: {e}") from e
    width, height = im.size
    if width < 1 or height < 1:
        raise ImageDecodeError(f"{src.source} has an empty {width}x{height} size")
    if reducible and _cap_scale(im, policy) is not None:
        return im
    _check_size(src.source, width, height, policy)
    return im


def _header_orientation(im: Image.Image) -> int:
    """EXIF orientation (1..8) from metadata already parsed with the header."""
    try:
        # PngImageFile.getexif() decodes the whole image to look for a late eXIf chunk; the base
        # implementation only reads what Image.open parsed, which is what a probe wants.
        exif = Image.Image.getexif(im)
        value = int(exif.get(0x0112, 1))
    except Exception:  # unreadable EXIF is ignored, as exif_transpose does
        return 1
    return value if 1 <= value <= 8 else 1


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited over white."""
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        im = _high_depth_to_l(im)
        mode = im.mode
    has_alpha = "A" in im.getbands() or "a" in im.getbands() or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        # White, not black: a transparent background reads as paper, as browsers render it.
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im if mode == "RGB" else im.convert("RGB")


def _high_depth_to_l(im: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer and float grayscale to 8-bit, scaled rather than clipped.

    PIL's own ``convert("L")`` clips, turning most 16-bit images white. ``I;16*`` is scaled
    65535 -> 255. ``I`` and ``F`` carry no declared range, so it is inferred: values already in
    0..255 (or 0..1 for float) are kept, 0..65535 is treated as 16-bit, anything else min-max.
    """
    import numpy as np  # only needed for these rare modes

    arr = np.asarray(im).astype(np.float64)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if im.mode.startswith("I;16"):
        arr = arr / 257.0
    elif im.mode == "F" and lo >= 0.0 and hi <= 1.0:
        arr = arr * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        pass
    elif lo >= 0.0 and hi <= 65535.0:
        arr = arr / 257.0
    else:
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else arr * 0.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")


def _decode(src: _Source, policy: MediaPolicy, scale: int = 1) -> ImageData:
    im = _open_checked(src, policy, reducible=scale > 1)
    fmt = im.format or "unknown"
    try:
        im.seek(0)  # the first frame of an animation; the header was checked already
        if scale > 1 and _draftable(im):
            # Reduced decode: libjpeg skips most of the IDCT and never allocates the full raster.
            width, height = im.size
            im.draft(None, (max(1, width // scale), max(1, height // scale)))
        _check_size(src.source, *im.size, policy)  # what is decoded must fit the caps
        im.load()
        # in_place: otherwise a full copy of the pixels even when nothing rotates (36 MB at 12 MP)
        ImageOps.exif_transpose(im, in_place=True)
        rgb = _to_rgb(im)
    except VlmlabError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{src.source} is too large to decode: {e}") from e
    except Exception as e:  # OSError "image file is truncated", SyntaxError, ValueError, ...
        raise ImageDecodeError(f"{src.source} ({fmt}) could not be decoded: {e}") from e
    return ImageData(
        image=rgb,
        width=rgb.width,
        height=rgb.height,
        format=fmt,
        sha256=hashlib.sha256(src.data).hexdigest(),
        nbytes=len(src.data),
        source=src.source,
    )


# --------------------------------------------------------------------------- public API


def load_image(
    ref: str | bytes | bytearray | memoryview, policy: MediaPolicy | None = None
) -> ImageData:
    """Load and decode one image under ``policy``.

    Args:
        ref: a ``data:image/...;base64,`` URL, raw base64, an ``http(s)://`` URL, a ``file://``
            URL or filesystem path (under ``policy.allowed_local_root``), or the raw bytes.
        policy: limits and allowed sources; ``MediaPolicy()`` (public URLs and inline data only)
            when omitted.

    Returns:
        :class:`ImageData` with the RGB image (first frame, EXIF orientation applied), its size,
        the detected format, and the sha256 / length of the source bytes.

    Raises:
        ForbiddenMediaError: the policy refuses the source (scheme, path, address, domain).
        MediaFetchError / MediaTimeoutError: a URL or file could not be read (in time).
        ImageTooLargeError: bytes or pixels over the policy's limits.
        ImageDecodeError: empty, truncated, or not a supported raster image.
    """
    policy = policy or MediaPolicy()
    return _decode(_read_source(ref, policy), policy)


@dataclass(frozen=True)
class ImageBytes:
    """An image's source bytes, read under a policy but not decoded yet.

    Callers with a content-addressed cache hash first (``sha256``) and decode only on a miss.
    """

    data: bytes
    source: str
    sha256: str


def read_image_bytes(
    ref: str | bytes | bytearray | memoryview, policy: MediaPolicy | None = None
) -> ImageBytes:
    """Fetch / read / base64-decode ``ref`` under ``policy`` (byte cap, SSRF guard, root), no
    decoding. Raises the source errors of :func:`load_image`."""
    policy = policy or MediaPolicy()
    src = _read_source(ref, policy)
    return ImageBytes(src.data, src.source, hashlib.sha256(src.data).hexdigest())


def decode_image(
    image: ImageBytes, policy: MediaPolicy | None = None, plan: DecodePlan | None = None
) -> ImageData:
    """Decode bytes from :func:`read_image_bytes` (pixel cap from the header first, EXIF
    orientation, first frame, RGB). Raises the decode errors of :func:`load_image`.

    With a ``plan`` from :func:`plan_decode`, a JPEG is decoded at the plan's reduced scale; the
    returned :class:`ImageData` then has the reduced size, as if that smaller image had been sent.
    """
    scale = plan.scale if plan is not None else 1
    return _decode(_Source(image.data, image.source), policy or MediaPolicy(), scale)


@dataclass(frozen=True)
class DecodePlan:
    """How :func:`decode_image` will decode an image, and what it will allocate, from its header.

    ``size`` is the source's and ``decoded_size`` what decoding returns (both after EXIF
    orientation); ``scale`` is 1 or the JPEG DCT scale (2, 4, 8). ``decode_bytes`` is the peak
    of decoding (the raster in its own mode, the RGB(A) conversions, EXIF rotation) and
    ``image_bytes`` the RGB image returned (PIL keeps RGB at 4 bytes per pixel).
    """

    size: tuple[int, int]
    decoded_size: tuple[int, int]
    scale: int
    format: str
    mode: str
    decode_bytes: int
    image_bytes: int


def _decode_bytes_per_pixel(im: Image.Image) -> int:
    mode = im.mode
    native = _PIL_PIXEL_BYTES.get(mode, 4)
    if mode == "RGB" and "transparency" not in im.info:
        total = native  # _to_rgb returns the decoded image itself
    else:
        total = native + _RGB_PIXEL_BYTES
        if "A" in im.getbands() or "a" in im.getbands() or "transparency" in im.info:
            total += 4  # the RGBA image composited over white
        if mode.startswith("I;16") or mode in ("I", "F"):
            total += 9  # _high_depth_to_l: a float64 array and the 8-bit result
    if _header_orientation(im) != 1:
        total += native  # exif_transpose builds the turned raster beside the original
    return total


def plan_decode(
    image: ImageBytes,
    policy: MediaPolicy | None = None,
    *,
    reduce_ok: Callable[[tuple[int, int], tuple[int, int]], bool] | None = None,
) -> DecodePlan:
    """Read the header of ``image`` and plan its decoding, without decoding a pixel.

    A JPEG over the policy's pixel caps is planned at the smallest DCT scale (1/2, 1/4, 1/8)
    that fits them instead of being refused. ``reduce_ok(size, reduced_size)`` (oriented
    (width, height) pairs) says whether a reduced decode serves the caller as well as the full
    image (the model downscales further with the same result); JPEGs get the largest such scale.

    Raises:
        ImageTooLargeError: over the caps with no reduced decode that fits.
        ImageDecodeError: not a supported image (as :func:`decode_image`).
    """
    policy = policy or MediaPolicy()
    im = _open_checked(_Source(image.data, image.source), policy, reducible=True)
    turn = _header_orientation(im) in _ROTATING_ORIENTATIONS
    size = (im.height, im.width) if turn else im.size
    scale = _cap_scale(im, policy) or 1
    if reduce_ok is not None and _draftable(im):
        for larger in (s for s in reversed(_JPEG_SCALES) if s > scale and min(im.size) >= s):
            width, height = _scaled(*im.size, larger)
            if reduce_ok(size, (height, width) if turn else (width, height)):
                scale = larger
                break
    width, height = _scaled(*im.size, scale)
    return DecodePlan(
        size=size,
        decoded_size=(height, width) if turn else (width, height),
        scale=scale,
        format=im.format or "unknown",
        mode=im.mode,
        decode_bytes=width * height * _decode_bytes_per_pixel(im),
        image_bytes=width * height * _RGB_PIXEL_BYTES,
    )


def probe_image(
    ref: str | bytes | bytearray | memoryview, policy: MediaPolicy | None = None
) -> ImageInfo:
    """Read an image's size and format from its header only, under the same rules as
    :func:`load_image` (same sources, byte cap and pixel cap). A file whose pixel data is
    truncated probes fine; only :func:`load_image` decodes far enough to notice.

    Returns:
        :class:`ImageInfo` (width/height after EXIF orientation, format, nbytes, sha256).

    Raises:
        the same errors as :func:`load_image`.
    """
    policy = policy or MediaPolicy()
    src = _read_source(ref, policy)
    im = _open_checked(src, policy)
    width, height = im.size
    if _header_orientation(im) in _ROTATING_ORIENTATIONS:
        width, height = height, width
    return ImageInfo(
        width=width,
        height=height,
        format=im.format or "unknown",
        nbytes=len(src.data),
        sha256=hashlib.sha256(src.data).hexdigest(),
        source=src.source,
    )
