"""``POST /views``: what the model sees of each image of a chat, before anything is generated.

For every image: the size the family's processor resizes it to, the grid it is cut into (patches
or merged patch tokens for one-view families such as Pixtral, Qwen2-VL and nano; tiles for the
tiling families: Phi-3.5-vision's crops, LLaVA-NeXT's anyres tiles, InternVL's and Idefics3's
tiles, each with a global view beside them), the number of encoder views, the prompt tokens it
costs, and a preview of the resized picture. The geometry is the family rule's
(:meth:`vlmlab.families.base.Family.image_layout`, parity-tested against each processor), with
the request's ``mm_processor_kwargs``.
"""

from __future__ import annotations

import asyncio
import base64
import io
from typing import Any

from vlmlab.media import load_image
from vlmlab.protocol.errors import BadRequestError
from vlmlab.protocol.openai import ChatCompletionRequest

PREVIEW_SIDE = 768  # the preview's longest side, in pixels


async def image_views(service: Any, body: ChatCompletionRequest) -> dict[str, Any]:
    """The views of every image in ``body``'s messages (see the module docstring)."""
    from vlmlab.families import get_family

    chat, _, options, _ = service.parse(body)
    engine = service.chain.current()
    info = engine.info()
    if not info.family:
        raise BadRequestError(f"{info.model} has no known family: vlmlab cannot say how its processor cuts images", param="model")
    family = get_family(info.family)
    resolved = family.resolve_options({**dict(service.settings.engines[0].processor_options), **options})
    loop = asyncio.get_running_loop()
    images = []
    for number, part in enumerate(chat.images):
        data = await loop.run_in_executor(service.media_pool, load_image, part.ref, service.policy)
        layout = family.image_layout(data.width, data.height, **resolved)
        preview = await loop.run_in_executor(service.media_pool, _preview, data.image, layout.resized)
        images.append({
            "index": number,
            "width": data.width,
            "height": data.height,
            "tokens": layout.tokens,
            "resized": list(layout.resized),
            "grid": list(layout.grid),
            "unit": "tiles" if layout.views > 1 else "patches",
            "views": layout.views,
            "preview": preview,
        })  # fmt: skip
    return {"model": service.settings.model_name, "family": family.name, "options": resolved, "images": images}


def _preview(image: Any, resized: tuple[int, int]) -> str:
    """The image at the processor's size, scaled down to PREVIEW_SIDE at most, as a PNG data URL."""
    width, height = resized
    scale = min(1.0, PREVIEW_SIDE / max(width, height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    buffer = io.BytesIO()
    image.convert("RGB").resize(size).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
