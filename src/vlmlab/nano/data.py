"""Turn generated samples into model inputs: chats, packed training turns, padded batches.

Shared by the trainer and the evaluator so both see the exact prompt that
``vlmlab.families.nano.render_prompt`` (and the checkpoint's chat template) produce.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from vlmlab.families.nano import render_prompt
from vlmlab.nano.tasks import Sample
from vlmlab.protocol.core import Chat, ImageData, ImagePart, Message


def sample_chat(sample: Sample, extra_turns: int = 0) -> tuple[Chat, list[str]]:
    """The sample as a chat: images then the question, the answer, then ``extra_turns`` more
    question / answer turns about the same images. Returns the chat (ending with the last
    assistant answer when ``extra_turns`` > 0 or the answer is included) and the answers."""
    parts: list[Any] = [
        ImagePart(data=ImageData(im, im.width, im.height, "PNG", "", 0, "nano")) for im in sample.images
    ]
    pairs = [(sample.question, sample.answer), *sample.extra[:extra_turns]]
    messages = []
    for k, (q, a) in enumerate(pairs):
        messages.append(Message.of("user", *(parts if k == 0 else []), q))
        messages.append(Message.of("assistant", a))
    return Chat(tuple(messages)), [a for _, a in pairs]


def question_prompt(sample: Sample) -> str:
    """The single-turn prompt the evaluator asks (ends with ``[/INST]``)."""
    chat, _ = sample_chat(sample)
    return render_prompt(Chat(chat.messages[:1]))


@dataclass
class Encoded:
    """One tokenised training example: ids, loss labels (-100 outside answers), its images."""

    input_ids: list[int]
    labels: list[int]
    pixel_values: list[Any]  # one [3, H, W] tensor per image
    image_sizes: list[tuple[int, int]]
    task: str


def encode_training(
    sample: Sample, processor: Any, rng: random.Random, max_extra: int = 3
) -> Encoded:
    """Pack the sample and up to ``max_extra`` of its extra questions into one chat, tokenised
    with the processor; only answer tokens and each closing ``</s>`` carry loss."""
    k = rng.randint(0, min(max_extra, len(sample.extra)))
    if k:
        sample = Sample(
            sample.id, sample.task, sample.images, sample.question, sample.answer,
            rng.sample(sample.extra, k), sample.meta,
        )  # fmt: skip
    chat, _ = sample_chat(sample, k)
    text = render_prompt(chat)
    enc = processor(text=text, images=sample.images, return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    tok = processor.tokenizer
    open_id, close_id = tok.convert_tokens_to_ids("[/INST]"), tok.convert_tokens_to_ids("</s>")
    labels = [-100] * len(ids)
    inside = False
    for i, t in enumerate(ids):
        if inside:
            labels[i] = t
            if t == close_id:
                inside = False
        elif t == open_id:
            inside = True
    sizes = [tuple(int(v) for v in hw) for hw in enc["image_sizes"].tolist()]
    pix = [enc["pixel_values"][j, :, : h, : w] for j, (h, w) in enumerate(sizes)]
    return Encoded(ids, labels, pix, sizes, sample.task)


def collate(batch: list[Encoded], pad_id: int) -> dict[str, Any]:
    """Right-padded ids / labels / mask and all images of the batch, zero-padded to one size
    (the Pixtral tower crops each back to its ``image_sizes`` entry)."""
    import torch

    length = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    images = [p for e in batch for p in e.pixel_values]
    sizes = [s for e in batch for s in e.image_sizes]
    h = max(s[0] for s in sizes)
    w = max(s[1] for s in sizes)
    pixels = torch.zeros((len(images), 3, h, w), dtype=images[0].dtype)
    for j, p in enumerate(images):
        pixels[j, :, : p.shape[1], : p.shape[2]] = p
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": mask,
        "pixel_values": pixels,
        "image_sizes": torch.tensor(sizes, dtype=torch.long),
    }
