"""Build an untrained nano checkpoint: a tiny Pixtral-style Llava in plain Hugging Face format.

The directory loads with ``AutoProcessor.from_pretrained`` and
``AutoModelForImageTextToText.from_pretrained`` and no ``trust_remote_code``: a
``LlavaForConditionalGeneration`` whose vision tower is a ``PixtralVisionConfig`` model and whose
language model is a small Mistral, with a ``PixtralProcessor`` (``PixtralImageProcessor`` +
a byte-level BPE tokenizer trained here on the task generator's texts).

Every geometry constant below must agree with :mod:`vlmlab.families.nano` (patch size, longest
edge, KV geometry, context length); ``tests/test_nano_checkpoint.py`` checks they do.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmlab.families import nano as nano_family

SPECIAL_TOKENS: tuple[str, ...] = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "<pad>",
    nano_family.IMAGE_TOKEN, nano_family.IMAGE_BREAK_TOKEN, nano_family.IMAGE_END_TOKEN,
)  # fmt: skip  -- ids 0..8 in this order
VOCAB_SIZE = 448  # 9 specials + 256 byte symbols + merges learnt on the task texts

# Renders exactly what vlmlab.families.nano.render_prompt renders: the system text (system
# messages joined by a blank line) opens the first user turn, image parts become [IMG] in
# place, assistant turns end with </s>. Content may be a string or an OpenAI-style part list.
CHAT_TEMPLATE = (
    "{%- macro body(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part.type == 'text' -%}{{ part.text }}"
    "{%- elif part.type in ['image', 'image_url'] -%}[IMG]"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- macro text_only(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part.type == 'text' -%}{{ part.text }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' -%}"
    "{%- set text = text_only(message.content) -%}"
    "{%- if text -%}"
    "{%- set ns.system = ns.system ~ ('\\n\\n' if ns.system else '') ~ text -%}"
    "{%- endif -%}{%- endif -%}"
    "{%- endfor -%}"
    "<s>"
    "{%- for message in messages -%}"
    "{%- if message.role == 'user' -%}"
    "[INST]{%- if ns.system -%}{{ ns.system ~ '\\n\\n' }}{%- set ns.system = '' -%}{%- endif -%}"
    "{{ body(message.content) }}[/INST]"
    "{%- elif message.role == 'assistant' -%}"
    "{{ body(message.content) }}</s>"
    "{%- endif -%}"
    "{%- endfor -%}"
)


@dataclass(frozen=True)
class NanoArch:
    """Model sizes. Text geometry is fixed by ``vlmlab.families.nano`` (its KVGeometry cites
    ``config.json text_config``); the vision sizes are the shipped checkpoint's: the spike's
    hidden 128 with 4 layers (it was trained with 2, then grown to 4 by :func:`grow_checkpoint`)."""

    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    vision_intermediate: int = 512
    text_hidden: int = 192
    text_layers: int = 3  # families/nano.py KVGeometry(3, 2, 48)
    text_heads: int = 4
    text_kv_heads: int = 2
    text_head_dim: int = 48
    text_intermediate: int = 512
    max_positions: int = nano_family.MAX_MODEL_LEN
    init_std: float = 0.06  # the spike: the library's 0.02 learnt shapes 2-5x slower


def tokenizer_corpus(n: int = 3000, seed: int = 10_000) -> list[str]:
    """Prompt texts (questions, answers, turn markers) from the generator, to learn merges on."""
    from vlmlab.nano.tasks import iter_samples

    texts = []
    for s in iter_samples(n, seed=seed):
        texts.append(s.question)
        texts.append(s.answer)
        for q, a in s.extra:
            texts.extend((q, a))
    return texts


def build_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` with the nano special tokens.

    Digits are split one per token so numbers are read digit by digit; no BOS/EOS is added on
    encode because the chat template writes ``<s>`` and ``</s>`` itself.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\d"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={
            "image_token": nano_family.IMAGE_TOKEN,
        },
        additional_special_tokens=list(SPECIAL_TOKENS[3:]),
        padding_side="left",  # batched greedy decoding appends on the right
        model_max_length=nano_family.MAX_MODEL_LEN,
        chat_template=CHAT_TEMPLATE,
    )


def build_processor(tokenizer: Any) -> Any:
    """``PixtralProcessor`` with the geometry of :mod:`vlmlab.families.nano`."""
    from transformers import PixtralImageProcessor, PixtralProcessor

    image_processor = PixtralImageProcessor(
        size={"longest_edge": nano_family.LONGEST_EDGE},
        patch_size={"height": nano_family.PATCH, "width": nano_family.PATCH},
    )
    return PixtralProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=nano_family.PATCH,
        spatial_merge_size=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(tokenizer: Any, arch: NanoArch = NanoArch()) -> Any:
    """The ``LlavaConfig`` (Pixtral vision tower + Mistral text model)."""
    from transformers import LlavaConfig, MistralConfig, PixtralVisionConfig

    vision = PixtralVisionConfig(
        hidden_size=arch.vision_hidden,
        intermediate_size=arch.vision_intermediate,
        num_hidden_layers=arch.vision_layers,
        num_attention_heads=arch.vision_heads,
        image_size=nano_family.LONGEST_EDGE,
        patch_size=nano_family.PATCH,
        initializer_range=arch.init_std,
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.text_hidden,
        intermediate_size=arch.text_intermediate,
        num_hidden_layers=arch.text_layers,
        num_attention_heads=arch.text_heads,
        num_key_value_heads=arch.text_kv_heads,
        head_dim=arch.text_head_dim,
        max_position_embeddings=arch.max_positions,
        initializer_range=arch.init_std,
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
        tie_word_embeddings=True,
        sliding_window=None,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=ids[nano_family.IMAGE_TOKEN],
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        tie_word_embeddings=True,
        # Its model_type is "llava", as Pixtral's HF port: this marker tells vlmlab's engines
        # to use the nano family rule (192 px) rather than Pixtral's (1024 px).
        vlmlab_family=nano_family.FAMILY.name,
    )


def build_model(config: Any, seed: int = 0) -> Any:
    """A freshly initialised fp32 ``LlavaForConditionalGeneration``."""
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.bos_token_id = config.text_config.bos_token_id
    return model.float()


def build_checkpoint(out_dir: str | Path, seed: int = 0, arch: NanoArch = NanoArch()) -> Path:
    """Write an untrained nano checkpoint (model, processor, tokenizer, chat template).

    Inputs: the target directory (created), the init seed, the architecture.
    Outputs: the directory path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(tokenizer_corpus())
    processor = build_processor(tokenizer)
    model = build_model(build_config(tokenizer, arch), seed)
    save_checkpoint(model, processor, out)
    return out


def save_checkpoint(model: Any, processor: Any, out_dir: str | Path) -> None:
    """Save model + processor in HF format, with the chat template as a standalone jinja file
    too (so both ``processor.apply_chat_template`` and ``tokenizer.apply_chat_template`` see it)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    processor.tokenizer.save_pretrained(out)
    # transformers 5 nests the image processor in processor_config.json; the standalone file
    # is what older loaders and vlmlab's own checks (families/nano.py) read.
    processor.image_processor.save_pretrained(out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    info = {"format": "vlmlab-nano", "params": sum(p.numel() for p in model.parameters())}
    (out / "vlmlab_nano.json").write_text(json.dumps(info, indent=2) + "\n")


def grow_checkpoint(src: str | Path, dst: str | Path, vision_layers: int, seed: int = 0) -> Path:
    """Copy the checkpoint in ``src`` to ``dst`` with its vision tower deepened to
    ``vision_layers`` layers, computing exactly the same function.

    The new layers go after the trained ones with freshly initialised weights, except that the
    two projections writing into the residual stream (attention ``o_proj``, feed-forward
    ``down_proj``) start at zero: each new layer adds nothing until training moves them, so a
    longer run keeps everything the checkpoint already knows (block expansion).

    Raises:
        ConfigError: ``vision_layers`` is not more than the checkpoint already has.
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlmlab.protocol.errors import ConfigError

    old = AutoModelForImageTextToText.from_pretrained(src)
    have = old.config.vision_config.num_hidden_layers
    if vision_layers <= have:
        raise ConfigError(f"vision_layers={vision_layers}: the checkpoint already has {have} vision layers")
    config = old.config
    config.vision_config.num_hidden_layers = vision_layers
    new = build_model(config, seed)
    missing, unexpected = new.load_state_dict(old.state_dict(), strict=False)
    assert not unexpected and all(".transformer.layers." in k for k in missing), (missing, unexpected)
    with torch.no_grad():
        for layer in new.model.vision_tower.transformer.layers[have:]:
            layer.attention.o_proj.weight.zero_()
            layer.feed_forward.down_proj.weight.zero_()
    save_checkpoint(new, AutoProcessor.from_pretrained(src), dst)
    return Path(dst)
