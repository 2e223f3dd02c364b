"""Request preprocessing for the transformers engine, with a content-addressed image cache.

For families whose images are independent of each other and of the text
(``Family.splice_images``), each image goes through the model's processor alone (with just the
placeholder as text); its expanded token ids and tensors are cached under
``sha256(bytes) + model + processor options`` and spliced between the separately tokenized text
pieces of the prompt. Placeholders are special tokens, which tokenizers split on before anything
else, so the spliced ids equal the processor's own output (``tests/test_engine_hf.py`` checks
this). Other families go through the processor whole, uncached.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vlmlab.cache import LRUCache, content_key
from vlmlab.engines.hf.prompt import PromptEncoder
from vlmlab.families import Family
from vlmlab.protocol.core import ImageData
from vlmlab.protocol.errors import BadRequestError, EngineError

logger = logging.getLogger(__name__)

# The family option that selects an image's variant for prompts with several images.
MULTI_IMAGE = "multi_image"


@dataclass(frozen=True)
class ProcessedImage:
    """One image as the processor made it: expanded token ids and tensors (batch dim 1)."""

    key: str
    width: int
    height: int
    ids: tuple[int, ...]
    tensors: Mapping[str, torch.Tensor]
    nbytes: int
    # Tensors with one entry per token of ``ids`` (Qwen's mm_token_type_ids): spliced along the
    # sequence, not stacked per image.
    token_tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Prepared:
    """A request's model inputs and what preparing them cost."""

    inputs: dict[str, Any]
    cache_hits: int = 0
    stages: dict[str, float] = field(default_factory=dict)
    image_keys: list[str] = field(default_factory=list)  # content keys, in prompt order (spliced)


def pad_cat(values: Sequence[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """Zero-pad every dimension but ``dim`` to the largest, then concatenate on ``dim``."""
    if len(values) == 1:
        return values[0]
    shape = [max(v.shape[d] for v in values) for d in range(values[0].dim())]
    padded = []
    for value in values:
        pads: list[int] = []
        for d in reversed(range(value.dim())):
            pads += [0, 0 if d == dim else shape[d] - value.shape[d]]
        padded.append(torch.nn.functional.pad(value, pads) if any(pads) else value)
    return torch.cat(padded, dim=dim)


def token_aligned(value: Any, length: int) -> bool:
    """Whether ``value`` holds one entry per token of a ``length``-token row (shape
    ``(1, length)``), like Qwen's ``mm_token_type_ids`` or Gemma's ``token_type_ids``. Such
    tensors follow the tokens: spliced and left-padded with them, 0 where text is."""
    return isinstance(value, torch.Tensor) and value.dim() == 2 and tuple(value.shape) == (1, length)


def json_key(options: Mapping[str, Any]) -> str:
    return ",".join(f"{k}={options[k]!r}" for k in sorted(options))


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class RequestPreprocessor:
    """Turns (prompt text with placeholders, images) into model inputs for one request."""

    def __init__(
        self, processor: Any, tokenizer: Any, family: Family | None, model_id: str,
        cache: LRUCache[ProcessedImage], defaults: Mapping[str, Any], own_images: bool = False,
        prompts: PromptEncoder | None = None,
    ):  # fmt: skip
        """``own_images``: process images with :mod:`vlmlab.preprocess` (proven equal to the HF
        processor, faster) where the family can expand its placeholder itself. ``prompts``: how
        prompts (user text marked in them, :mod:`vlmlab.engines.hf.prompt`) become ids."""
        self.own_images = bool(own_images and family is not None and family.expand_placeholder is not None)
        # Families whose images change when they share a prompt (LLaVA-OneVision: base view only)
        # say so with a ``multi_image`` option; vlmlab.preprocess makes that variant too.
        self.own_multi = self.own_images and any(o.name == MULTI_IMAGE for o in family.options)  # type: ignore[union-attr]
        self._fast: dict[str, Any] = {}
        self.processor = processor
        self.tokenizer = tokenizer
        self.family = family
        self.model_id = model_id
        self.cache = cache
        self.defaults = dict(defaults)
        # The text one image takes in this checkpoint's rendered prompt: the family's, unless
        # the checkpoint's template writes the processor's own token instead (see HFEngine).
        self.placeholder = family.image_placeholder if family is not None else ""
        self.prompts = prompts or PromptEncoder(tokenizer, [self.placeholder])
        # vlmlab.preprocess outputs the processor keeps to itself (InternVL's num_patches)
        self._not_model_inputs: set[str] = set()

    @property
    def splices(self) -> bool:
        return bool(self.family and self.family.splice_images and self.cache.enabled)

    def key(self, sha256: str, options: Mapping[str, Any], mode: str = "exact") -> str:
        # Fast-mode pixels differ from exact ones; the processor's own path has one mode.
        fast = {"preprocess_mode": "fast"} if mode == "fast" and self.own_images else {}
        return content_key(self.model_id, sha256, {**self.defaults, **options, **fast})

    def lookup(self, sha256: str, options: Mapping[str, Any], mode: str = "exact") -> ProcessedImage | None:
        """A cached image by content hash, so callers can skip decoding on a hit."""
        return self.cache.get(self.key(sha256, options, mode)) if self.splices else None

    def pool_task(self, options: Mapping[str, Any], mode: str = "exact") -> tuple[str, dict[str, Any]] | None:
        """``(family, options)`` to preprocess an image from its bytes in a worker process, where
        this engine's images go through vlmlab.preprocess (and can be cached and spliced)."""
        if not (self.own_images and self.splices):
            return None
        assert self.family is not None
        return self.family.name, self._own_options(options)

    def adopt(self, sha256: str, options: Mapping[str, Any], mode: str, out: Any) -> ProcessedImage:
        """A worker's :class:`~vlmlab.preprocess.Preprocessed` as this engine's cached image."""
        key = self.key(sha256, options, mode)
        image = self._from_preprocessed(key, out)
        self.cache.put(key, image)
        return image

    def __call__(
        self, prompt: str, images: Sequence[ImageData], options: Mapping[str, Any], mode: str = "exact"
    ) -> Prepared:
        if mode not in ("exact", "fast"):
            raise BadRequestError(f"preprocess_mode must be 'exact' or 'fast', got {mode!r}", param="mm_processor_kwargs")
        options = {k: v for k, v in options.items() if k != MULTI_IMAGE}  # the engine's to set, below
        if self.splices or (self.own_images and len(images) == 1):
            # One image alone is spliceable in every family (LLaVA-OneVision's anyres included):
            # its expansion depends on no other image.
            return self._spliced(prompt, images, options, mode)
        if self.own_multi and images:  # several: each its shared-prompt variant
            return self._spliced(prompt, images, {**options, MULTI_IMAGE: True}, mode)
        if any(d.image is None for d in images):
            raise EngineError("an image arrived without pixels for a model that cannot use cached images")
        start = time.perf_counter()
        inputs = self._run_prompt(prompt, [d.image for d in images], options)
        return Prepared(inputs, 0, {"processor": time.perf_counter() - start})

    def _run_prompt(
        self, prompt: str, images: list[Any], options: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The processor on a whole prompt. Runs of user text with control strings reach it as
        one stand-in token each (it would expand a placeholder in them, and tokenize their
        special strings as controls), swapped for the runs' ids afterwards."""
        text, stand_in, runs = self.prompts.for_processor(prompt)
        inputs = self._run(text, images, options)
        if stand_in is None:
            return inputs
        ids = inputs["input_ids"][0].tolist()
        at = [i for i, token in enumerate(ids) if token == stand_in]
        if len(at) != len(runs):
            raise EngineError(f"the processor kept {len(at)} of the {len(runs)} runs of user text")
        image_processor = getattr(self.processor, "image_processor", None)
        image_keys = set(getattr(image_processor, "model_input_names", ()))
        for name, value in list(inputs.items()):
            if name != "input_ids" and (name in image_keys or not token_aligned(value, len(ids))):
                continue
            pieces: list[torch.Tensor] = []
            start = 0
            for position, run in zip(at, runs):
                if name == "input_ids":
                    fill = torch.tensor([run], dtype=value.dtype)
                else:  # attended; text (0) in per-token tensors such as mm_token_type_ids
                    mask = int(name == "attention_mask")
                    fill = torch.full((1, len(run)), mask, dtype=value.dtype)
                pieces += [value[:, start:position], fill]
                start = position + 1
            inputs[name] = torch.cat([*pieces, value[:, start:]], dim=1)
        return inputs

    def _run(self, text: str, images: list[Any], options: Mapping[str, Any]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt", "add_special_tokens": False}
        if images:
            # One list per prompt, as ProcessorMixin.apply_chat_template passes them: a flat
            # list reads as one image per prompt to some processors (LLaVA-OneVision then keeps
            # anyres for each image of a multi-image prompt, which the model was not run with).
            kwargs["images"] = [images]
        kwargs.update({**self.defaults, **options})
        try:
            return dict(self.processor(**kwargs))
        except (TypeError, ValueError) as exc:
            raise BadRequestError(
                f"the processor rejected the request (options {dict(options)}): {exc}", param="mm_processor_kwargs"
            ) from exc

    def _spliced(self, prompt: str, images: Sequence[ImageData], options: Mapping[str, Any], mode: str = "exact") -> Prepared:
        assert self.family is not None
        placeholder = self.placeholder
        # The template's placeholders only: one in the user's text is text (prompt.py).
        pieces = self.prompts.encode_between(prompt, placeholder)
        if len(pieces) != len(images) + 1:
            raise EngineError(
                f"the chat template emitted {len(pieces) - 1} {placeholder!r} placeholders for {len(images)} images"
            )
        prepared = Prepared({})
        ids: list[int] = []
        tensors: dict[str, list[torch.Tensor]] = {}
        token_tensors: dict[str, list[tuple[int, torch.Tensor]]] = {}  # (offset in ids, values)
        for index, piece in enumerate(pieces):
            ids += piece
            if index == len(images):
                break
            image = self._image(images[index], options, prepared, mode)
            prepared.image_keys.append(image.key)
            for name, value in image.token_tensors.items():
                token_tensors.setdefault(name, []).append((len(ids), value))
            ids += image.ids
            for name, value in image.tensors.items():
                tensors.setdefault(name, []).append(value)
        prepared.inputs = {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "attention_mask": torch.ones((1, len(ids)), dtype=torch.long),
            **{name: pad_cat(values, self._stack_dim(values)) for name, values in tensors.items()},
        }
        for name, spans in token_tensors.items():
            full = torch.zeros((1, len(ids)), dtype=spans[0][1].dtype)
            for offset, value in spans:
                full[:, offset : offset + value.shape[1]] = value
            prepared.inputs[name] = full
        if "batch_num_images" in prepared.inputs:  # LLaVA-OneVision: images in this one prompt
            prepared.inputs["batch_num_images"] = torch.tensor([len(images)], dtype=torch.long)
        return prepared

    def _image(self, data: ImageData, options: Mapping[str, Any], prepared: Prepared, mode: str = "exact") -> ProcessedImage:
        key = self.key(data.sha256, options, mode)
        given = data.processed if isinstance(data.processed, ProcessedImage) and data.processed.key == key else None
        if given is not None and data.format != "cached":
            return given  # preprocessed for this request (by a server's process pool): no hit
        found, claimed = (given, False) if given is not None else self.cache.get_or_claim(key)
        if found is not None:
            prepared.cache_hits += 1
            return found
        try:
            return self._make_image(key, data, options, prepared, mode)
        finally:
            if claimed:
                self.cache.release(key)

    def _make_image(self, key: str, data: ImageData, options: Mapping[str, Any], prepared: Prepared, mode: str) -> ProcessedImage:
        """Preprocess one image and cache it (a miss of :meth:`_image`)."""
        if data.image is None:
            raise EngineError(f"image {data.source or data.sha256[:12]} has no pixels and no cache entry")
        start = time.perf_counter()
        if self.own_images:
            image = self._own_image(key, data, options, prepared, mode)
            prepared.stages["processor"] = prepared.stages.get("processor", 0.0) + time.perf_counter() - start
            self.cache.put(key, image)
            return image
        out = self._run(self.placeholder, [data.image], options)
        prepared.stages["processor"] = prepared.stages.get("processor", 0.0) + time.perf_counter() - start
        tensors = {k: v for k, v in out.items() if isinstance(v, torch.Tensor) and k not in ("input_ids", "attention_mask")}
        # Text-side outputs shaped like input_ids follow the tokens. The image processor's own
        # outputs never do, even when shaped alike (a 2-token image's image_sizes is (1, 2)).
        image_keys = set(getattr(getattr(self.processor, "image_processor", None), "model_input_names", ()))
        length = out["input_ids"].shape[1]
        per_token = {k: v for k, v in tensors.items() if k not in image_keys and token_aligned(v, length)}
        tensors = {k: v for k, v in tensors.items() if k not in per_token}
        image = ProcessedImage(
            key, data.width, data.height, tuple(out["input_ids"][0].tolist()), tensors,
            tensor_bytes(tensors) + tensor_bytes(per_token) + 8 * length, per_token,
        )  # fmt: skip
        self.cache.put(key, image)
        return image

    def _own_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The vlmlab.preprocess options that reproduce the loaded processor."""
        assert self.family is not None
        merged = {**self.defaults, **options}
        # Families whose rules exist in several variants (Pixtral: mistral / hf, Qwen: hf /
        # qwen_vl_utils): this engine runs transformers' processor, so its rules are "hf".
        variant = next((o for o in self.family.options if o.name == "variant"), None)
        if variant is not None and "hf" in (variant.choices or ()):
            merged.setdefault("variant", "hf")
        if merged.get("variant", "hf") == "hf":  # transformers' rules: match its backend too
            merged.setdefault("backend", self._backend())
        return merged

    def _own_image(
        self, key: str, data: ImageData, options: Mapping[str, Any], prepared: Prepared, mode: str = "exact"
    ) -> ProcessedImage:
        """vlmlab.preprocess tensors + the family's own placeholder expansion."""
        from vlmlab.preprocess import get_preprocessor

        assert self.family is not None
        merged = self._own_options(options)
        cache_key = f"{mode}:{json_key(merged)}"
        if cache_key not in self._fast:
            self._fast[cache_key] = get_preprocessor(self.family.name, mode, **merged)  # type: ignore[arg-type]
        out = self._fast[cache_key](data.image)
        for stage, seconds in out.stages.items():
            prepared.stages[stage] = prepared.stages.get(stage, 0.0) + seconds
        return self._from_preprocessed(key, out)

    def _from_preprocessed(self, key: str, out: Any) -> ProcessedImage:
        assert self.family is not None and self.family.expand_placeholder is not None
        ids = self.tokenizer(self.family.expand_placeholder(out.grid), add_special_tokens=False)["input_ids"]
        tensors = {k: torch.from_numpy(v) for k, v in out.tensors.items() if k not in self._not_model_inputs}
        per_token: dict[str, torch.Tensor] = {}
        if getattr(self.processor, "return_mm_token_type_ids", False):  # Qwen: 1 on image tokens
            per_token["mm_token_type_ids"] = torch.tensor(self.processor.create_mm_token_type_ids([list(ids)]))
        nbytes = tensor_bytes(tensors) + tensor_bytes(per_token) + 8 * len(ids)
        width, height = out.size
        return ProcessedImage(key, width, height, tuple(ids), tensors, nbytes, per_token)

    def _stack_dim(self, values: Sequence[torch.Tensor]) -> int:
        """Where one prompt's images stack: the family's dimension for its image tensors
        (metadata with fewer dimensions, like ``image_sizes``, always on 0)."""
        dim = self.family.image_tensor_dim if self.family is not None else 0
        return dim if all(v.dim() > dim + 1 for v in values) else 0

    def _backend(self) -> str:
        """Which transformers implementation the loaded image processor is: the ``*Pil`` classes
        (``use_fast=False``) or the default torchvision-backed ones."""
        name = type(getattr(self.processor, "image_processor", None)).__name__
        return "pil" if name.endswith("Pil") else "torchvision"

    def prove_own(self, sizes: Sequence[tuple[int, int]] = ((37, 53), (333, 250), (1024, 700))) -> str | None:
        """Check the vlmlab image path against the loaded processor on a few probe images (ids
        equal, every tensor within 1e-5); on any difference (a checkpoint whose processor
        config differs from the family's defaults, say) turn it off and say why."""
        if not self.own_images:
            return None
        for w, h in sizes:
            problem = self._probe(w, h)
            if problem:
                self.own_images = False
                return problem
        if self.own_multi:
            problem = self._probe_multi(sizes[:2])
            if problem:  # images alone keep the vlmlab path
                self.own_multi = False
                logger.warning("%s: prompts with several images use the model's own processor (%s)", self.model_id, problem)
        return None

    @staticmethod
    def _probe_image(w: int, h: int) -> ImageData:
        """A seeded noise image."""
        from PIL import Image

        rng = torch.Generator().manual_seed(w * 7919 + h)
        pixels = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=rng).numpy()
        return ImageData(Image.fromarray(pixels), w, h, "PNG", f"probe-{w}x{h}", 0, "probe")

    def _probe_multi(self, sizes: Sequence[tuple[int, int]]) -> str | None:
        """What differs between the two paths on one prompt with these images, or None."""
        images = [self._probe_image(w, h) for w, h in sizes]
        prompt = self.placeholder * len(images)
        try:
            mine = self._spliced(prompt, images, {MULTI_IMAGE: True})
        except Exception as exc:  # noqa: BLE001 - any failure means: use the processor
            return f"vlmlab preprocessing failed on a {len(images)}-image probe: {exc}"
        ref = self._run(prompt, [d.image for d in images], {})
        ours = {k: v for k, v in mine.inputs.items() if k != "attention_mask"}
        theirs = {k: v for k, v in ref.items() if isinstance(v, torch.Tensor) and k != "attention_mask"}
        if set(ours) != set(theirs):
            return f"outputs {sorted(ours)} differ from the processor's {sorted(theirs)} on a {len(images)}-image probe"
        return _first_difference(ours, theirs, f"a {len(images)}-image probe")

    def _probe(self, w: int, h: int) -> str | None:
        """What differs between the two paths on one seeded noise image, or None."""
        data = self._probe_image(w, h)
        try:
            mine = self._own_image(data.sha256, data, {}, Prepared({}))
        except Exception as exc:  # noqa: BLE001 - any failure means: use the processor
            return f"vlmlab preprocessing failed on a {w}x{h} probe: {exc}"
        ref = self._run(self.placeholder, [data.image], {})
        if tuple(ref["input_ids"][0].tolist()) != mine.ids:
            return f"image tokens differ from the processor's on a {w}x{h} probe"
        extra = {name for name in mine.tensors if name not in ref}
        if extra:  # outputs the processor does not hand the model: left out from now on
            self._not_model_inputs |= extra
            mine = self._own_image(data.sha256, data, {}, Prepared({}))
        ours = {**mine.tensors, **mine.token_tensors}
        missing = [k for k, v in ref.items() if isinstance(v, torch.Tensor) and k not in ("input_ids", "attention_mask") and k not in ours]
        if missing:
            return f"the processor also returns {missing}, which vlmlab does not make"
        return _first_difference(ours, ref, f"a {w}x{h} probe")


def _first_difference(ours: Mapping[str, torch.Tensor], theirs: Mapping[str, Any], label: str) -> str | None:
    """The first of ``ours`` whose shape or values (beyond 1e-5) differ from ``theirs``."""
    for name, value in ours.items():
        other = theirs[name]
        if other.shape != value.shape or not torch.allclose(other.to(value.dtype), value, atol=1e-5):
            return f"{name} differs from the processor's on {label}"
    return None
