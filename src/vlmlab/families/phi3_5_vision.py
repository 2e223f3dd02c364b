"""Phi-3.5-vision-instruct: the Phi-3-vision HD transform with ``num_crops`` 4 by default.

Reference: ``microsoft/Phi-3.5-vision-instruct`` remote code ``image_processing_phi3_v.py`` and
``processing_phi3_v.py``: the same HD transform and prompt expansion as Phi-3-vision (see
``phi3_vision.py``, which holds the shared rule and chat format). Its ``preprocessor_config.json``
sets ``num_crops: 4`` (vLLM's tests: "the default num_crops of phi-3.5-vision is 4"); the model
card recommends 4 for multi-frame and 16 for single-frame input.
"""

from __future__ import annotations

from vlmlab.families.base import Checkpoint, Family
from vlmlab.families.phi3_vision import (
    PHI3_MINI_KV,
    image_tag,
    num_crops_option,
    phi3v_layout,
    render_prompt,
)

DEFAULT_NUM_CROPS = 4  # microsoft/Phi-3.5-vision-instruct preprocessor_config.json num_crops

FAMILY = Family(
    name="phi3_5_vision",
    display_name="Phi-3.5-vision",
    # config.json "model_type": "phi3_v" (shared with Phi-3-vision; the newer checkpoint owns it).
    model_types=("phi3_v",),
    aliases=("phi-3.5-vision", "phi3.5-vision"),
    layout_rule=phi3v_layout,
    render_prompt_fn=render_prompt,
    options=(num_crops_option(DEFAULT_NUM_CROPS),),
    # The model card's multi-frame example feeds 19 slides (`for i in range(1, 20)`,
    # <|image_1|> ... <|image_19|>) at num_crops=4; 20 rounds that up. 20 images at 757 tokens
    # each is ~15k of the 128k context.
    max_images=20,
    image_placeholder=image_tag(1),  # numbered: <|image_1|>, <|image_2|>, ...
    checkpoints=(
        Checkpoint(
            hub_id="microsoft/Phi-3.5-vision-instruct",
            # Model card: "Phi-3.5-vision has 4.2B parameters"; the hub's safetensors count is
            # ~4.15B. Approximate.
            params=4_150_000_000,
            kv=PHI3_MINI_KV,  # same Phi-3-mini text model (config.json: 32 layers, MHA, 3072/32)
            max_model_len=131_072,  # model card "Context length 128K tokens"
            source="microsoft/Phi-3.5-vision-instruct model card and config.json (approximate)",
            aliases=("phi-3.5-vision-instruct",),
        ),
    ),
    source=(
        "image_processing_phi3_v.py calc_hd_transform_size / calc_num_image_tokens_from_image_size"
    ),
    # Placeholders are numbered across the prompt (<|image_1|>, <|image_2|>).
    splice_images=False,
)
