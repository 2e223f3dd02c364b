"""Images as data URLs, for the backends that hand a server (or vLLM) an encoded image.

Shared here rather than in one backend's package: the backends do not import each other
(import-linter's independence contract in ``pyproject.toml``).
"""

from __future__ import annotations

import base64
import io

from vlmlab.media_net import short_ref
from vlmlab.protocol.core import ImagePart
from vlmlab.protocol.errors import BadRequestError

# Re-encoded images above this size are sent as JPEG instead of PNG: 20 MB is OpenAI's documented
# per-image limit ("Images are supported up to 20MB", platform.openai.com vision guide) and
# vLLM's / vlmlab's default max image bytes.
MAX_PNG_BYTES = 20 * 2**20


def encode_image(part: ImagePart) -> str:
    """A data URL of the decoded image: lossless PNG (the receiver sees exactly the pixels a local
    engine would, EXIF rotation already applied), or JPEG quality 95 when the PNG would exceed
    :data:`MAX_PNG_BYTES`.

    Raises:
        BadRequestError: the part holds no decoded pixels.
    """
    data = part.data
    if data is None or data.image is None:
        raise BadRequestError(f"image {short_ref(part.ref or '')!r} has no decoded pixels to send to the remote server")
    buffer = io.BytesIO()
    # compress_level 1: several times faster than the default 6 for ~10-30 % more bytes.
    data.image.save(buffer, "PNG", compress_level=1)
    mime = "image/png"
    if buffer.tell() > MAX_PNG_BYTES:
        buffer = io.BytesIO()
        data.image.convert("RGB").save(buffer, "JPEG", quality=95)
        mime = "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"
