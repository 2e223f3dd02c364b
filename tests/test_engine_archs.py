"""The transformers engine on tiny random checkpoints of other VLM architectures.

Each case builds a checkpoint inside the test: a config with tiny dimensions ->
``Model(config).save_pretrained``, the model's real processor class with the real checkpoint's
image-processor values (so the vlmlab family rule, which uses those values, must match the
processor exactly), a small word-level tokenizer carrying the model's real special tokens, and a
chat template of the official shape. The checkpoint is loaded through ``load_engine`` and checked
against references that do not go through vlmlab: transformers' own ``processor.apply_chat_template``
(usage counts: prompt and image tokens) and greedy ``model.generate`` at batch 1 (text, completion
tokens), for requests run alone and for requests of different prompt lengths and image sizes
decoded together in one batch.

Weights are initialised with a large std (0.3) so that greedy output depends on every prompt
position: with the default 0.02 a random model repeats the same tokens whatever the input, and
a batching bug (wrong positions, misaligned masks) would go unseen.
"""

from __future__ import annotations

import asyncio
import hashlib
import string
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

from vlmlab.engines import EngineSpec, GenerationRequest, complete, load_engine  # noqa: E402
from vlmlab.families import get_family  # noqa: E402
from vlmlab.protocol.core import Chat, ImageData, ImagePart, Message, SamplingParams  # noqa: E402

INIT_STD = 0.3
MAX_TOKENS = 5

# -- tokenizer --------------------------------------------------------------------------------

# Pre-tokenizer pieces. Idefics3-8B-Llama3's tile tags are not special tokens: the Llama-3 BPE
# splits "<row_1_col_1>" into '<' 'row' '_' '1' '_col' '_' '1' '>' and "<global-img>" into
# '<' 'global' '-img' '>', and "\n\n" is one token (vlmlab.families.idefics3 counts with those
# numbers). The same pieces here make this tokenizer count those tags exactly as Llama-3 does.
PIECES = r"_col|-img|[A-Za-z]+|\d|\n+|[^\n]"
WORDS = (
    "system user assistant User Assistant You are a helpful What is in this image picture "
    "colour shape Describe the two images and compare them please briefly INST row col global "
    "img"
).split()


def build_tokenizer(specials: Sequence[str], **named: str) -> Any:
    """A word-level fast tokenizer: the special tokens, then words, newline runs and characters.

    Decoding joins tokens without spaces (``Fuse``), so text round-trips. ``named`` sets eos /
    pad / bos (each must be one of ``specials``).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in [*specials, "<unk>", *WORDS, "_col", "-img", "\n\n", *string.printable]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PIECES), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        additional_special_tokens=list(specials),
        padding_side="left",
        **named,
    )


def text_dims(tokenizer: Any, **extra: Any) -> dict[str, Any]:
    """Tiny decoder dimensions shared by every case (2 layers, hidden 32, GQA 2:1)."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16384,
        initializer_range=INIT_STD,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **extra,
    )


def vit_dims(**extra: Any) -> dict[str, Any]:
    """A one-layer vision tower of width 32 (``extra`` overrides)."""
    dims = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, initializer_range=INIT_STD)
    return {**dims, **extra}


def save(model_cls: Any, config: Any, processor: Any, out: Path) -> None:
    torch.manual_seed(0)
    model = model_cls(config)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)


# -- checkpoints ------------------------------------------------------------------------------

# Qwen/Qwen2-VL-*-Instruct chat_template.json, without the video and add_vision_id branches.
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip


def qwen_processor(processor_cls: Any) -> tuple[Any, Any]:
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    tokenizer = build_tokenizer(QWEN_SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    # Qwen2-VL / Qwen2.5-VL-*-Instruct preprocessor_config.json: min_pixels 3136, max_pixels
    # 12845056, patch_size 14, merge_size 2, temporal_patch_size 2 (the class defaults differ).
    image_processor = Qwen2VLImageProcessor(
        min_pixels=3136, max_pixels=12845056, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    processor = processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN_TEMPLATE,
    )
    return processor, tokenizer


# mrope_section splits head_dim / 2 = 8 rotary pairs over (time, height, width).
QWEN_ROPE = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}
QWEN_PATCHING = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2)  # real values


def qwen_token_ids(tokenizer: Any) -> dict[str, int]:
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def build_qwen2_vl(out: Path) -> None:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    processor, tokenizer = qwen_processor(Qwen2VLProcessor)
    config = Qwen2VLConfig(
        text_config=text_dims(tokenizer, rope_parameters=QWEN_ROPE),
        vision_config=dict(
            QWEN_PATCHING, depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, initializer_range=INIT_STD
        ),
        initializer_range=INIT_STD,
        **qwen_token_ids(tokenizer),
    )
    save(Qwen2VLForConditionalGeneration, config, processor, out)


def build_qwen2_5_vl(out: Path) -> None:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    processor, tokenizer = qwen_processor(Qwen2_5_VLProcessor)
    config = Qwen2_5_VLConfig(
        text_config=text_dims(tokenizer, rope_parameters=QWEN_ROPE),
        # window_size 112 as the real vision config; its full-attention blocks (7, 15, 23, 31
        # of 32) shrink to block 0 of 1.
        vision_config=dict(
            QWEN_PATCHING, depth=1, hidden_size=32, intermediate_size=64, out_hidden_size=32, num_heads=2,
            window_size=112, fullatt_block_indexes=[0], initializer_range=INIT_STD,
        ),  # fmt: skip
        initializer_range=INIT_STD,
        **qwen_token_ids(tokenizer),
    )
    save(Qwen2_5_VLForConditionalGeneration, config, processor, out)


# llava-hf/llava-v1.6-mistral-7b-hf chat_template.json.
LLAVA_NEXT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + '</s> '}}{% endif %}{% endfor %}"
)
# preprocessor_config.json image_grid_pinpoints of llava-hf/llava-v1.6-mistral-7b-hf.
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def build_llava_next(out: Path) -> None:
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, MistralConfig
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    tokenizer = build_tokenizer(["<s>", "</s>", "<pad>", "<image>"], bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    # llava-hf/llava-v1.6-mistral-7b-hf preprocessor_config.json (size, crop_size, pinpoints)
    # and processor_config.json (patch_size 14, strategy "default", 1 additional token: CLS).
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=LLAVA_NEXT_PINPOINTS
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_NEXT_TEMPLATE,
    )
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**vit_dims(num_hidden_layers=2, image_size=336, patch_size=14, projection_dim=32)),
        text_config=MistralConfig(**text_dims(tokenizer, sliding_window=None)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        initializer_range=INIT_STD,
    )
    save(LlavaNextForConditionalGeneration, config, processor, out)


# llava-hf/llava-onevision-qwen2-*-ov-hf chat_template.json.
ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}{# Render all text next #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\n' + content['text'] }}{% endfor %}{{'<|im_end|>'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_llava_onevision(out: Path) -> None:
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    tokenizer = build_tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    # llava-hf/llava-onevision-qwen2-0.5b-ov-hf preprocessor_config.json: size 384x384, the 36
    # pinpoints 384*i x 384*j (the class defaults) and SigLIP statistics 0.5 (not the class's CLIP).
    image_processor = LlavaOnevisionImageProcessor(
        size={"height": 384, "width": 384}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]
    )
    pinpoints = [list(p) for p in image_processor.image_grid_pinpoints]
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(),
        # processor_config.json: num_image_tokens 729, strategy "full", anyres_max_9.
        num_image_tokens=729,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=ONEVISION_TEMPLATE,
    )
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**vit_dims(image_size=384, patch_size=14)),
        text_config=Qwen2Config(**text_dims(tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        initializer_range=INIT_STD,
    )
    save(LlavaOnevisionForConditionalGeneration, config, processor, out)


# HuggingFaceM4/Idefics3-8B-Llama3 chat_template (the Idefics2 template after <|begin_of_text|>).
IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build_idefics3(out: Path) -> None:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3VisionConfig, LlamaConfig
    from transformers import Idefics3ImageProcessor, Idefics3Processor

    tokenizer = build_tokenizer(
        ["<|begin_of_text|>", "<|end_of_text|>", "<fake_token_around_image>", "<image>", "<end_of_utterance>"],
        bos_token="<|begin_of_text|>",
        eos_token="<end_of_utterance>",
        pad_token="<|end_of_text|>",
    )
    # HuggingFaceM4/Idefics3-8B-Llama3 preprocessor_config.json: size.longest_edge 1456,
    # max_image_size.longest_edge 364, do_image_splitting true; processor_config.json
    # image_seq_len 169 = (364/14)^2 / scale_factor^2.
    image_processor = Idefics3ImageProcessor(
        size={"longest_edge": 1456}, max_image_size={"longest_edge": 364}, do_image_splitting=True
    )
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=169, chat_template=IDEFICS3_TEMPLATE
    )
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(**vit_dims(image_size=364, patch_size=14)),
        text_config=LlamaConfig(**text_dims(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=2,  # config.json scale_factor
        initializer_range=INIT_STD,
    )
    save(Idefics3ForConditionalGeneration, config, processor, out)


# OpenGVLab/InternVL3-1B-hf chat_template.jinja (transformers' port), text and image parts.
INTERNVL_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_internvl(out: Path) -> None:
    from transformers import GotOcr2ImageProcessor, InternVLConfig, InternVLForConditionalGeneration
    from transformers import InternVLProcessor, InternVLVideoProcessor, Qwen2Config
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

    tokenizer = build_tokenizer(
        ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    )
    # InternVL2/3 preprocessor_config.json: 448 px tiles, 1..12 tiles plus a thumbnail, ImageNet
    # statistics (GotOcr2's class defaults are CLIP's).
    image_processor = GotOcr2ImageProcessor(
        size={"height": 448, "width": 448}, crop_to_patches=True, min_patches=1, max_patches=12,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    )  # fmt: skip
    processor = InternVLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=InternVLVideoProcessor(),
        image_seq_length=256, chat_template=INTERNVL_TEMPLATE,
    )  # fmt: skip
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(**vit_dims(image_size=[448, 448], patch_size=[14, 14])),
        text_config=Qwen2Config(**text_dims(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        downsample_ratio=0.5,
        initializer_range=INIT_STD,
    )
    save(InternVLForConditionalGeneration, config, processor, out)


@dataclass(frozen=True)
class Case:
    """One architecture: how to build it, its family, and the requests to send."""

    name: str
    build: Callable[[Path], None]
    family: str
    sizes: tuple[tuple[int, int], ...]  # (width, height): one single-image request each
    pair: tuple[tuple[int, int], tuple[int, int]] | None  # two images in one prompt
    options: tuple[tuple[int, int], dict[str, Any]] | None = None  # a request with options
    placeholder: str = "<image>"
    # Count the reference's image tokens as the processor's image token ids (start, context,
    # end) rather than by deleting the placeholder from the prompt text.
    count_image_ids: bool = False


CASES = (
    Case(
        "qwen2_vl", build_qwen2_vl, "qwen2_vl",
        sizes=((56, 56), (84, 56), (60, 100), (130, 40)),
        pair=((56, 84), (100, 60)),
        # 200x200 -> 196x196 (49 pads) by default; max_pixels 12544 = 112x112 -> 16 pads.
        options=((200, 200), {"max_pixels": 12544}),
        placeholder="<|vision_start|><|image_pad|><|vision_end|>",
    ),
    Case(
        "qwen2_5_vl", build_qwen2_5_vl, "qwen2_5_vl",
        sizes=((56, 56), (112, 56), (70, 120)),
        pair=((56, 84), (84, 84)),
        options=((200, 200), {"max_pixels": 12544}),
        placeholder="<|vision_start|><|image_pad|><|vision_end|>",
    ),
    Case(
        # Canvases (h x w): 40x20 and 20x40 -> 336x672 (the portrait one keeps 12 of 48
        # feature columns after unpadding), 300x500 -> 672x336, 700x700 -> 672x672 (2x2 tiles).
        "llava_next", build_llava_next, "llava_next",
        sizes=((40, 20), (300, 500), (700, 700), (20, 40)),
        pair=None,  # the family allows one image per prompt
    ),
    Case(
        "llava_onevision", build_llava_onevision, "llava_onevision",
        sizes=((40, 30), (30, 50), (500, 300)),
        pair=((40, 30), (60, 60)),  # several images: base view only, 729 + 1 each
    ),
    Case(
        # Every image is upscaled to a 1456 px long side: 4:3 -> 3x4 tiles, squares 4x4, 2:5 4x2.
        "idefics3", build_idefics3, "idefics3",
        sizes=((40, 30), (32, 32), (20, 50)),
        pair=((40, 30), (30, 40)),
        options=((40, 30), {"do_image_splitting": False}),
    ),
    Case(
        # transformers' InternVL port: 40x30 -> 4x3 tiles + thumbnail (13 x 256 + 2 tokens),
        # 30x40 -> 3x4 + thumbnail, 60x20 -> 3x1 + thumbnail (4 x 256 + 2).
        "internvl", build_internvl, "internvl2",
        sizes=((40, 30), (60, 20)),
        pair=((60, 20), (30, 40)),
        placeholder="<IMG_CONTEXT>",
        count_image_ids=True,
    ),
)


# -- requests ---------------------------------------------------------------------------------

QUESTIONS = (
    "What is in this image?",
    "Describe the picture briefly please.",
    "What colour is the shape in this image? Describe it.",
    "What shape?",
)


@dataclass(frozen=True)
class Spec:
    """A request: question, image sizes (in prompt order) and processor options."""

    question: str
    sizes: tuple[tuple[int, int], ...]
    options: tuple[tuple[str, Any], ...] = ()


def make_image(width: int, height: int) -> ImagePart:
    """A deterministic noise image (seeded by its size) as a loaded image part."""
    pixels = np.random.default_rng(width * 1000 + height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    digest = hashlib.sha256(pixels.tobytes()).hexdigest()
    return ImagePart(data=ImageData(image, width, height, "PNG", digest, pixels.nbytes))


def chat_of(spec: Spec) -> Chat:
    return Chat((Message.of("user", *[make_image(w, h) for w, h in spec.sizes], spec.question),))


def request_of(spec: Spec) -> GenerationRequest:
    return GenerationRequest(
        chat_of(spec), SamplingParams(max_tokens=MAX_TOKENS, temperature=0), dict(spec.options)
    )


def hf_messages(spec: Spec, images: list[Any]) -> list[dict[str, Any]]:
    """The spec as the list-of-parts messages the processors' chat templates take."""
    parts: list[dict[str, Any]] = [{"type": "image", "image": image} for image in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": spec.question}]}]


def specs_for(case: Case) -> list[Spec]:
    """One request per size (different question lengths), the image pair, the options case,
    and a text-only request."""
    specs = [Spec(QUESTIONS[i % len(QUESTIONS)], (size,)) for i, size in enumerate(case.sizes)]
    if case.pair:
        specs.append(Spec("Compare the two images.", case.pair))
    if case.options:
        size, options = case.options
        specs.append(Spec(QUESTIONS[0], (size,), tuple(options.items())))
    specs.append(Spec("What is a shape?", ()))
    return specs


def concurrent_specs(case: Case) -> list[Spec]:
    """Four requests of different prompt lengths and image sizes (with the pair if any), and a
    text-only one: a row without image tensors in a batch with them."""
    specs = [Spec(QUESTIONS[i % len(QUESTIONS)], (size,)) for i, size in enumerate(case.sizes)]
    if case.pair:
        specs = [*specs[:3], Spec("Compare the two images.", case.pair)]
    return [*specs[:4], Spec("What is a shape?", ())]


@dataclass(frozen=True)
class Expected:
    """What the reference processor and ``model.generate`` say about one request."""

    prompt_tokens: int
    image_tokens: int
    text: str
    completion_tokens: int
    finish_reason: str


@dataclass
class Loaded:
    """A built checkpoint, the engine on it, and a reference processor + model loaded apart."""

    case: Case
    path: Path
    engine: Any
    processor: Any
    model: Any
    memo: dict[Spec, Expected] = field(default_factory=dict)

    def expected(self, spec: Spec) -> Expected:
        """The reference answer: the processor's own chat-template path (images passed per
        conversation, as transformers does), then greedy ``generate`` at batch 1."""
        if spec in self.memo:
            return self.memo[spec]
        tokenizer = self.processor.tokenizer
        images = [part.data.image for part in chat_of(spec).images]
        messages = hf_messages(spec, images)
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
            processor_kwargs=dict(spec.options),
        )  # fmt: skip
        length = inputs["input_ids"].shape[1]
        text_only = len(tokenizer(prompt.replace(self.case.placeholder, ""), add_special_tokens=False)["input_ids"])
        if self.case.count_image_ids:  # the template's newlines around the token would merge
            marks = set(self.processor.image_token_ids)
            text_only = length - sum(1 for t in inputs["input_ids"][0].tolist() if t in marks)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        new = out[0, length:].tolist()
        eos = {self.model.generation_config.eos_token_id, tokenizer.eos_token_id}
        stop = next((i for i, t in enumerate(new) if t in eos), None)
        ids = new if stop is None else new[:stop]
        found = Expected(
            prompt_tokens=length,
            image_tokens=length - text_only if spec.sizes else 0,
            text=tokenizer.decode(ids, skip_special_tokens=True),
            completion_tokens=len(ids),
            finish_reason="length" if stop is None else "stop",
        )
        self.memo[spec] = found
        return found


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def loaded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    case: Case = request.param
    path = tmp_path_factory.mktemp(case.name)
    case.build(path)
    engine = load_engine(EngineSpec(model=str(path), device="cpu", dtype="fp32"))
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    yield Loaded(case, path, engine, processor, model)
    engine.close()


# -- tests ------------------------------------------------------------------------------------


def test_family_is_detected_from_model_type(loaded: Loaded) -> None:
    info = loaded.engine.info()
    assert info.family == loaded.case.family
    assert info.engine == "hf"


def test_batch1_usage_and_text_match_the_references(loaded: Loaded) -> None:
    """Usage from the processor's real ids, counts from the family rule, greedy text from
    ``model.generate``: all equal, for one image, two images, options and no image."""
    engine, family = loaded.engine, get_family(loaded.case.family)
    for spec in specs_for(loaded.case):
        result = asyncio.run(complete(engine, request_of(spec)))
        want = loaded.expected(spec)
        label = f"{loaded.case.name} {spec.sizes} {dict(spec.options)}"
        assert (result.prompt_tokens, result.image_tokens) == (want.prompt_tokens, want.image_tokens), label
        assert (result.text, result.completion_tokens, result.finish_reason) == (
            want.text, want.completion_tokens, want.finish_reason,
        ), label  # fmt: skip
        assert result.completion_tokens <= MAX_TOKENS
        count = engine.count_prompt_tokens(chat_of(spec), dict(spec.options))
        assert (count.prompt_tokens, count.image_tokens) == (want.prompt_tokens, want.image_tokens), label
        if spec.sizes:
            assert sum(family.prompt_image_tokens(list(spec.sizes), **dict(spec.options))) == want.image_tokens
    assert engine.expansion_mismatches == 0


async def run_concurrently(engine: Any, requests: list[GenerationRequest]) -> tuple[list[Any], list[int]]:
    """Decode ``requests`` as one batch: a first request occupies the batch worker, which waits
    until all of ``requests`` are queued, so they are collated together. Returns the results and
    the batch sizes the worker ran."""
    batcher = engine.batcher
    # Static batching collates in run_batch; continuous batching prefills new arrivals in admit.
    owner, name = (batcher.decoder, "admit") if batcher.decoder is not None else (batcher, "run_batch")
    original = getattr(owner, name)
    sizes: list[int] = []
    started = threading.Event()

    def observed(jobs: list[Any]) -> None:
        if not sizes:
            started.set()
            deadline = time.monotonic() + 60
            while batcher.waiting < len(requests) and time.monotonic() < deadline:
                time.sleep(0.005)
        sizes.append(len(jobs))
        original(jobs)

    setattr(owner, name, observed)
    try:
        first = asyncio.ensure_future(complete(engine, requests[0]))
        while not started.is_set():
            if first.done():  # failed before reaching the worker
                first.result()
            await asyncio.sleep(0.005)
        results = await asyncio.gather(*(complete(engine, r) for r in requests))
        await first
    finally:
        setattr(owner, name, original)
    return results, sizes


def test_concurrent_requests_decode_as_at_batch_1(loaded: Loaded) -> None:
    """Requests of different prompt lengths and image sizes (and one without an image),
    left-padded into one batch, give the batch-1 reference's text and usage."""
    specs = concurrent_specs(loaded.case)
    results, sizes = asyncio.run(run_concurrently(loaded.engine, [request_of(s) for s in specs]))
    assert sizes == [1, len(specs)]
    assert len({r.prompt_tokens for r in results}) > 1  # really different lengths: padding ran
    for spec, result in zip(specs, results):
        want = loaded.expected(spec)
        assert (result.text, result.completion_tokens, result.finish_reason) == (
            want.text, want.completion_tokens, want.finish_reason,
        ), f"{loaded.case.name} {spec.sizes}"  # fmt: skip
        assert (result.prompt_tokens, result.image_tokens) == (want.prompt_tokens, want.image_tokens)


def test_spec_processor_options_reach_the_processor_and_the_count(loaded: Loaded) -> None:
    """Options set on the engine (``EngineSpec.processor_options``, as the shipped configs do)
    change the processor's expansion and the family count alike."""
    if loaded.case.options is None:
        # A family without processor options refuses one at load, naming it.
        from vlmlab.protocol.errors import UnknownOptionError

        with pytest.raises(UnknownOptionError, match="unknown option 'num_crops'"):
            load_engine(EngineSpec(model=str(loaded.path), device="cpu", dtype="fp32", processor_options={"num_crops": 4}))
        return
    size, options = loaded.case.options
    engine = load_engine(EngineSpec(model=str(loaded.path), device="cpu", dtype="fp32", processor_options=options))
    try:
        spec = Spec(QUESTIONS[0], (size,))
        result = asyncio.run(complete(engine, request_of(spec)))
        want = loaded.expected(Spec(QUESTIONS[0], (size,), tuple(options.items())))
        assert want.image_tokens != loaded.expected(spec).image_tokens  # the option matters here
        assert (result.prompt_tokens, result.image_tokens, result.text) == (want.prompt_tokens, want.image_tokens, want.text)
        count = engine.count_prompt_tokens(chat_of(spec))
        assert (count.prompt_tokens, count.image_tokens) == (want.prompt_tokens, want.image_tokens)
        assert engine.expansion_mismatches == 0
    finally:
        engine.close()


def test_spec_option_unknown_to_the_family_fails_at_load(tmp_path: Path) -> None:
    from vlmlab.protocol.errors import UnknownOptionError

    build_qwen2_vl(tmp_path)
    with pytest.raises(UnknownOptionError, match="num_crops"):
        load_engine(EngineSpec(model=str(tmp_path), device="cpu", processor_options={"num_crops": 4}))


def test_vlmlab_image_path_equals_the_processor_where_the_family_expands_itself(loaded: Loaded) -> None:
    """Families that expand their own placeholder (Qwen2-VL / 2.5-VL, LLaVA-NeXT here) run
    images through vlmlab.preprocess, proven at load against the checkpoint's processor; the
    request inputs equal the processor's own output on sizes beyond the probes, with options."""
    family = get_family(loaded.case.family)
    pre = loaded.engine.preprocessor
    assert pre.own_images == (family.expand_placeholder is not None), loaded.case.name
    if not pre.own_images:
        return
    text = f"a{pre.placeholder}b"  # what this checkpoint's template writes for an image
    sizes = [*loaded.case.sizes, (641, 479), (1500, 90)]
    option_sets = [{}] + ([loaded.case.options[1]] if loaded.case.options else [])
    for (w, h), options in [(s, o) for s in sizes for o in option_sets]:
        part = make_image(w, h)
        pre.cache.clear()
        mine = pre(text, [part.data], options).inputs
        ref = loaded.processor(text=[text], images=[[part.data.image]], return_tensors="pt",
                               add_special_tokens=False, **options)  # fmt: skip
        label = (loaded.case.name, w, h, options)
        assert mine["input_ids"].tolist() == ref["input_ids"].tolist(), label
        for name, value in ref.items():
            if name in ("input_ids", "attention_mask"):
                continue
            assert name in mine, (label, name)
            assert mine[name].shape == value.shape, (label, name)
            assert torch.allclose(mine[name].to(value.dtype), value, atol=1e-5), (label, name)
    # Prompts with several images, where an image's variant depends on sharing the prompt
    # (LLaVA-OneVision: base views): the vlmlab path too, proven at load like the single one.
    assert pre.own_multi == any(o.name == "multi_image" for o in family.options), loaded.case.name
    if not pre.own_multi:
        return
    text = f"a{pre.placeholder}b{pre.placeholder}{pre.placeholder}c"
    for trio in [((40, 30), (60, 60), (1500, 90)), ((641, 479), (30, 50), (384, 384))]:
        parts = [make_image(w, h) for w, h in trio]
        pre.cache.clear()
        mine = pre(text, [p.data for p in parts], {}).inputs
        ref = loaded.processor(text=[text], images=[[p.data.image for p in parts]], return_tensors="pt", add_special_tokens=False)
        assert mine["input_ids"].tolist() == ref["input_ids"].tolist(), trio
        assert set(mine) == set(ref), trio
        for name, value in ref.items():
            assert mine[name].shape == value.shape, (trio, name)
            assert torch.allclose(mine[name].to(value.dtype), value, atol=1e-5), (trio, name)
        assert mine["batch_num_images"].tolist() == [3]


def test_a_processor_config_the_family_does_not_know_turns_the_vlmlab_path_off(tmp_path: Path) -> None:
    """A checkpoint whose image processor differs from the family's defaults (here a custom
    max_pixels in its preprocessor config) fails the load-time proof: the engine then uses the
    processor, and still answers."""
    import json

    case = next(c for c in CASES if c.name == "qwen2_vl")
    case.build(tmp_path)
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = tmp_path / name
        if path.exists():
            config = json.loads(path.read_text())
            target = config.get("image_processor", config)
            target["max_pixels"] = 28 * 28 * 4
            if isinstance(target.get("size"), dict):
                target["size"]["longest_edge"] = 28 * 28 * 4
            path.write_text(json.dumps(config))
    engine = load_engine(EngineSpec(model=str(tmp_path), device="cpu", dtype="fp32"))
    try:
        assert not engine.preprocessor.own_images
        result = asyncio.run(complete(engine, request_of(specs_for(case)[0])))
        assert result.image_tokens == 4 + 2  # 2x2 merged patches + vision start / end
    finally:
        engine.close()


def test_answer_shaping_works_on_every_decode_path(loaded: Loaded) -> None:
    """Structured outputs, logprobs, logit_bias and penalties on each architecture: continuous
    batching (1-D RoPE text models) and ``generate`` (Qwen2-VL's M-RoPE) alike. Random weights:
    only the constraint's shape and the logprobs' consistency are checked."""
    import re

    from vlmlab.protocol.core import StructuredOutput

    engine = loaded.engine
    spec = specs_for(loaded.case)[0]
    sampling = SamplingParams(
        max_tokens=12, temperature=0, logprobs=True, top_logprobs=3, repetition_penalty=1.3, frequency_penalty=0.5,
        structured=StructuredOutput("regex", "[0-9]{2}-[a-c]{2}"),
    )  # fmt: skip
    result = asyncio.run(complete(engine, GenerationRequest(chat_of(spec), sampling, dict(spec.options))))
    assert re.fullmatch("[0-9]{2}-[a-c]{2}", result.text), result.text
    assert result.finish_reason == "stop"
    assert result.logprobs is not None and len(result.logprobs) == result.completion_tokens
    assert "".join(t.token for t in result.logprobs) == result.text
    assert all(t.top[0][0] == t.token for t in result.logprobs)  # greedy: the most likely allowed token
    choice = StructuredOutput("choice", '["alpha", "beta"]')
    picked = asyncio.run(complete(engine, GenerationRequest(chat_of(spec), SamplingParams(max_tokens=12, temperature=1.0, seed=1, structured=choice), dict(spec.options))))
    assert picked.text in ("alpha", "beta")
