"""The transformers engine: any HF VLM checkpoint (and remote-code models behind a flag).

The model's own processor and chat template build the prompt; :mod:`vlmlab.engines.hf.batching`
decodes concurrent requests together. Image tokens come from the family rule and are checked
against the processor's real expansion for each request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import resource
import sys
import threading
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from vlmlab.cache import LRUCache
from vlmlab.config import EngineSpec
from vlmlab.engines.base import (
    FEATURES,
    Capabilities,
    Engine,
    EngineInfo,
    GenerationRequest,
    PromptCount,
)
from vlmlab.engines.copies import CopyPlan, folder_weight_bytes, plan_copies
from vlmlab.engines.hf.preprocess import RequestPreprocessor
from vlmlab.engines.hf.prompt import PromptEncoder, fast_decode, to_hf_messages, token_span_bound
from vlmlab.engines.quantization import hf_quantization
from vlmlab.engines.sources import (
    check_nano_transformers,
    hub_load_plan,
    known_model_names,
    resolve_model,
)
from vlmlab.families import Family, get_family
from vlmlab.hub import did_you_mean
from vlmlab.protocol.core import (
    Chat,
    GenerationChunk,
    GenerationResult,
    ImagePart,
    SamplingParams,
    StructuredOutput,
    Timings,
)
from vlmlab.protocol.errors import (
    BadRequestError,
    ConfigError,
    ContextLengthError,
    EngineError,
    NotFoundError,
    VlmlabError,
)
from vlmlab.protocol.tools import plain_chat

logger = logging.getLogger(__name__)

# Text longer than this is rendered and tokenised in a worker thread: below it the hop costs
# more than the work (a few hundred microseconds of tokenising), above it the event loop, and
# every other request with it, would wait.
LONG_TEXT_CHARS = 20_000


def detect_family(config: Any, path: str, hint: str | None) -> Family | None:
    """The family of a loaded config: the hint, vlmlab's own marker, or the ``model_type``."""
    if hint:
        return get_family(hint)
    marker = getattr(config, "vlmlab_family", None)
    if marker:
        return get_family(marker)
    if (Path(path) / "vlmlab_nano.json").exists():  # nano checkpoints exported before the marker
        return get_family("nano")
    model_type = getattr(config, "model_type", "")
    vision = getattr(getattr(config, "vision_config", None), "model_type", "")
    if model_type == "llava" and vision == "pixtral":
        return get_family("mistral-community/pixtral-12b")
    try:
        return get_family(model_type)
    except VlmlabError:
        logger.warning("no vlmlab family for model_type %r (%s): image tokens are counted by the processor only", model_type, path)
        return None


def peak_memory_bytes(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


class HFEngine(Engine):
    """transformers backend with request batching. Create with :meth:`load`."""

    name = "hf"
    capabilities = Capabilities(streaming=True, batching=True, max_images=8, features=FEATURES)

    def __init__(self, spec: EngineSpec, model: Any, processor: Any, family: Family | None, model_id: str, device: str, dtype: str, load_s: float):
        from vlmlab.engines.hf.batching import Batcher
        from vlmlab.engines.hf.logits import TokenPieces

        self.spec = spec
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.family = family
        self.model_id = model_id
        self.device = device
        self.dtype = dtype
        self.load_s = load_s
        self.max_model_len = spec.max_model_len or self._model_max_len()
        self.max_images = family.max_images if family else 8
        self.tokenizer.padding_side = "left"
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (self.tokenizer.eos_token_id or 0)
        self.eos_ids = self._eos_ids()
        self.max_token_chars = token_span_bound(self.tokenizer)
        self.decode_ids = fast_decode(self.tokenizer)  # built once: every decode step detokenizes
        self.pieces = TokenPieces(self.tokenizer)  # token text and bytes, for logprobs
        self._grammars: Any = None  # structured.Grammars, made on the first structured request
        self._grammars_lock = threading.Lock()
        self.expansion_mismatches = 0
        self.preprocess_cache: LRUCache[Any] = LRUCache(
            spec.preprocess_cache_bytes, sizeof=lambda image: image.nbytes, name="preprocess"
        )
        # Vision-tower outputs by the same content keys (encode_ahead models): an image sent
        # again, as chat clients do every turn, skips the tower. A quarter of the same budget.
        self.encoder_cache: LRUCache[Any] = LRUCache(
            spec.preprocess_cache_bytes // 4, sizeof=lambda t: t.numel() * t.element_size(), name="encoder"
        )
        # extra["preprocess"]: "vlmlab" (default) uses vlmlab.preprocess where the family supports
        # it (proven equal to the model's processor by tests); "hf" always uses the model's own.
        self.prompts = self._prompt_encoder(processor, family)
        self.preprocessor = RequestPreprocessor(
            processor, self.tokenizer, family, model_id, self.preprocess_cache, spec.processor_options,
            own_images=spec.extra.get("preprocess", "vlmlab") == "vlmlab", prompts=self.prompts,
        )
        if family is not None:
            self.preprocessor.placeholder = self._template_placeholder(family)
        problem = self.preprocessor.prove_own()
        if problem:
            logger.warning("%s: using the model's own processor for images (%s)", model_id, problem)
        decoder = None
        if spec.extra.get("continuous_batching", True):
            from vlmlab.engines.hf.continuous import ContinuousDecoder, supports_continuous

            if supports_continuous(model):
                decoder = ContinuousDecoder(
                    model, self.pad_id, self.eos_ids,
                    self.decode_ids, device,
                    on_step=lambda: self.batcher.mark_progress(),
                    # More intra-op threads for big prefills only when asked: measured here, a
                    # second OpenMP thread made batch-16 prefills 10x slower while another
                    # process (a preprocessing worker, a training job) used the other core.
                    prefill_threads=int(spec.extra.get("prefill_threads", 1)),
                    # prefills on their own thread while the batch keeps decoding (another core)
                    overlap=bool(spec.extra.get("overlap_prefill", True)),
                )  # fmt: skip
                decoder.max_len = self.max_model_len
                decoder.pieces = self.pieces
        self.continuous = decoder is not None
        # LLaVA-layout models (nano, Pixtral's port, LLaVA-1.5) take the vision tower's output
        # precomputed (mm_encoder_outputs): encode each request's images as it is prepared.
        self.encode_ahead = (
            self.continuous and getattr(model.config, "model_type", "") == "llava" and spec.extra.get("encode_ahead", True)
        )
        self.batcher = Batcher(self._run_batch, spec.max_batch_size, decoder=decoder)
        self.replicas: list[Any] = []  # data-parallel copies in other processes (replicas.py)
        self.copies_reason = "as asked (--data-parallel-size)"
        self.local_load = 0  # requests decoding in this process
        self.local_submitted = 0

    # -- loading -------------------------------------------------------------------------------

    @classmethod
    def load(cls, spec: EngineSpec, *, replica: bool = False) -> HFEngine:
        """Load the model; with ``spec.data_parallel_size`` > 1 also start that many minus one
        replica processes (:mod:`vlmlab.engines.hf.replicas`), which load meanwhile.
        ``replica``: this is one of them."""
        start = time.perf_counter()
        source, hint = resolve_model(spec.model, variant="hf")
        kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code, "revision": spec.revision}
        if hub_load_plan(spec.model, source, spec.revision):  # no Hub now: the cached copy
            kwargs["local_files_only"] = True
        import torch  # after the checks above: a model that cannot load fails without this wait
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        if hint == "nano":
            check_nano_transformers()
        try:
            config = AutoConfig.from_pretrained(source, **kwargs)
        except OSError as exc:
            if Path(source).exists():
                raise NotFoundError(f"{source} has no readable config.json: {exc}") from exc
            why = " ".join(str(exc).split())
            raise NotFoundError(f"cannot load model {spec.model!r}: {why}{did_you_mean(spec.model, known_model_names())}") from exc
        except ValueError as exc:
            if "trust_remote_code" in str(exc) and not spec.trust_remote_code:
                raise ConfigError(f"{spec.model} ships its own model code: pass --trust-remote-code if you trust it") from exc
            raise ConfigError(f"unsupported model {spec.model!r}: {exc}") from exc
        family = detect_family(config, source, hint)
        if family is not None:
            # The spec's options also decide the counts (count_prompt_tokens): an option the
            # family rule does not know fails here, before the weights load, not per request.
            family.resolve_options(spec.processor_options)
        device = cls._pick_device(spec.device)
        plan = _copy_plan(spec, source, family, device)
        spec = dataclasses.replace(spec, data_parallel_size=plan.copies)
        replicas: list[Any] = []
        if spec.data_parallel_size > 1 and not replica:
            from vlmlab.engines.hf.replicas import start_replicas

            if device != "cpu":
                logger.warning("--data-parallel-size %d on %s: every replica uses the same device", spec.data_parallel_size, device)
            replicas = start_replicas(spec, spec.data_parallel_size - 1, load_replica)
        try:
            dtype = {"auto": "bf16" if device.startswith("cuda") else "fp32"}.get(spec.dtype, spec.dtype)
            torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
            quant = hf_quantization(spec.extra, device, torch_dtype)  # --quantization / --load-in-4bit
            try:
                processor = AutoProcessor.from_pretrained(source, **kwargs)
                try:
                    model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch_dtype, **kwargs, **quant.load_kwargs)
                except ValueError as exc:
                    if not spec.trust_remote_code:
                        raise ConfigError(f"unsupported architecture for {spec.model!r} ({config.__class__.__name__}): {exc}") from exc
                    from transformers import (
                        AutoModelForCausalLM,  # remote-code VLMs (Phi-3.5-vision)
                    )

                    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs, **quant.load_kwargs)
            except (OSError, ImportError) as exc:
                raise EngineError(f"failed to load {spec.model!r}: {exc}") from exc
            if not getattr(processor, "chat_template", None) and not getattr(getattr(processor, "tokenizer", None), "chat_template", None):
                raise ConfigError(f"{spec.model!r} has no chat template; add chat_template.jinja to the checkpoint")
            if not quant.places_weights:  # bitsandbytes put the weights on the GPU while loading
                model.to(device)
            quant.finish(model.eval())
            # Intra-op threads pay off for big matrices only: on a tiny model (nano, 2.5M parameters)
            # every op is dispatch-bound and a second thread only adds synchronisation (measured:
            # 1 thread decodes 1.4-1.5x faster than 2 on this CPU, benchmarks/engine_hf.py).
            # extra["torch_threads"] overrides.
            params = sum(p.numel() for p in model.parameters())
            default_threads = 1 if params < 100_000_000 else max(1, (os.cpu_count() or 1) // spec.data_parallel_size)
            torch.set_num_threads(int(spec.extra.get("torch_threads", default_threads)))
            engine = cls(spec, model, processor, family, spec.model, device, quant.label(dtype), time.perf_counter() - start)
            engine.copies_reason = plan.reason
        except BaseException:  # the replicas would otherwise outlive a failed load
            for started in replicas:
                started.close()
            raise
        if replicas:
            from vlmlab.engines.hf.replicas import await_replicas

            engine.replicas = await_replicas(replicas)
            engine.load_s = time.perf_counter() - start
        return engine

    @staticmethod
    def _pick_device(device: str) -> str:
        import torch

        if device == "auto":
            if torch.cuda.is_available():
                return "cuda"
            if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
                return "mps"
            return "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
        return device

    def _model_max_len(self) -> int:
        config = getattr(self.model.config, "text_config", self.model.config)
        return int(getattr(config, "max_position_embeddings", 0) or 4096)

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (self.model.generation_config, self.model.config, self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif value:
                ids.update(value)
        return ids

    # -- prompts -------------------------------------------------------------------------------

    def _template_placeholder(self, family: Family) -> str:
        """What this checkpoint's chat template writes for an image: the family's placeholder
        (the original format), or the processor's image token where a transformers port renders
        that instead (InternVL's port writes ``<IMG_CONTEXT>`` where InternVL2 wrote ``<image>``)."""
        token = getattr(self.processor, "image_token", None)
        if not isinstance(token, str) or not token or token in family.image_placeholder:
            return family.image_placeholder
        try:
            probe = self.render(Chat.single("?", [ImagePart(ref="probe")]))
        except Exception:  # noqa: BLE001 - a template that cannot render this keeps the default
            return family.image_placeholder
        return token if family.image_placeholder not in probe and token in probe else family.image_placeholder

    def _prompt_encoder(self, processor: Any, family: Family | None) -> PromptEncoder:
        """User text as text (:mod:`vlmlab.engines.hf.prompt`). Controls: the tokenizer's special
        tokens and the strings this template may write for an image (the family's placeholder,
        or the processor's image token, see _template_placeholder)."""
        # The processor's own tokens (image, video, break, ...) are never a stand-in for text.
        own = [v for k, v in vars(processor).items() if k.endswith("_token") and isinstance(v, str)]
        image_token = getattr(processor, "image_token", None)
        placeholders = [family.image_placeholder if family else ""]
        placeholders.append(image_token if isinstance(image_token, str) else "")
        return PromptEncoder(self.tokenizer, placeholders, keep=own)

    def render(self, chat: Chat) -> str:
        """The prompt as the chat template writes it, with each control string from the chat's
        text wrapped in markers (:mod:`vlmlab.engines.hf.prompt`); text without one, as it is."""
        template_owner = self.processor if getattr(self.processor, "chat_template", None) else self.tokenizer
        kwargs: dict[str, Any] = {}
        if chat.tools or any(m.role == "tool" or m.tool_calls for m in chat.messages):
            template = getattr(template_owner, "chat_template", None)
            if "tools" in str(template or ""):  # the checkpoint's own tool format
                kwargs["tools"] = [
                    {"type": "function", "function": {"name": t.name, "description": t.description, "parameters": json.loads(t.parameters)}}
                    for t in chat.tools
                ] or None
            else:  # a template without tools: tools and tool turns as plain text
                chat = plain_chat(chat)
        messages = to_hf_messages(chat, self.prompts.mark)
        return template_owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)

    def _check_images(self, chat: Chat) -> None:
        if len(chat.images) > self.max_images:
            raise BadRequestError(
                f"At most {self.max_images} image(s) may be provided in one request, got {len(chat.images)}",
                param="messages",
            )

    def count_prompt_tokens(
        self, chat: Chat, processor_options: Mapping[str, Any] | None = None, prompt: str | None = None
    ) -> PromptCount:
        """Text tokens of the rendered prompt (``prompt`` when already rendered) plus each
        image's expansion by the family rule."""
        self._check_images(chat)
        prompt = self.render(chat) if prompt is None else prompt
        text_ids = self.prompts.encode(prompt)
        images = [img.data for img in chat.images]  # type: ignore[union-attr]
        if self.family is None:
            return self._count_with_processor(prompt, images, processor_options or {})
        # The processor runs with the spec's options under the request's; so must the rule.
        options = {**self.spec.processor_options, **(processor_options or {})}
        per_image = self.family.prompt_image_tokens([(d.width, d.height) for d in images], **options)
        placeholder = len(self.tokenizer(self.preprocessor.placeholder, add_special_tokens=False)["input_ids"])
        total = len(text_ids) - placeholder * len(images) + sum(per_image)
        return PromptCount(total, sum(per_image), tuple(per_image))

    def _count_with_processor(self, prompt: str, images: list[Any], options: Mapping[str, Any]) -> PromptCount:
        inputs = self.preprocessor(prompt, images, options).inputs
        total = int(inputs["input_ids"].shape[1])
        text = len(self.prompts.encode(prompt))
        return PromptCount(total, max(0, total - text))

    def lookup_processed(
        self, sha256: str, processor_options: Mapping[str, Any] | None = None, mode: str = "exact"
    ) -> Any | None:
        return self.preprocessor.lookup(sha256, processor_options or {}, mode)

    def pool_task(self, processor_options: Mapping[str, Any], mode: str = "exact") -> tuple[str, dict[str, Any]] | None:
        return self.preprocessor.pool_task(processor_options, mode)

    def adopt_preprocessed(self, sha256: str, processor_options: Mapping[str, Any], mode: str, pre: Any) -> Any:
        return self.preprocessor.adopt(sha256, processor_options, mode, pre)

    # -- generation ----------------------------------------------------------------------------

    def _render_and_count(self, request: GenerationRequest) -> tuple[str, PromptCount]:
        prompt = self.render(request.chat)
        return prompt, self.count_prompt_tokens(request.chat, request.processor_options, prompt)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk | GenerationResult]:
        from vlmlab.engines.hf.batching import Job

        start = time.perf_counter()
        chat, sampling = request.chat, request.sampling
        loop = asyncio.get_running_loop()
        if chat.text_characters > LONG_TEXT_CHARS:  # template and tokenizer off the event loop
            prompt, count = await loop.run_in_executor(None, self._render_and_count, request)
        else:
            prompt, count = self._render_and_count(request)
        template_s = time.perf_counter() - start
        if count.prompt_tokens + sampling.max_tokens > self.max_model_len:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {count.prompt_tokens + sampling.max_tokens} tokens ({count.prompt_tokens} in "
                f"the messages, {sampling.max_tokens} in the completion). Please reduce the length of "
                "the messages, the images or the completion."
            )
        images = [img.data for img in chat.images]
        prep_start = time.perf_counter()
        args = (prompt, images, request.processor_options, request.preprocess_mode)
        # Where the request will decode, chosen now so that a replica runs its own vision tower.
        # A grammar's state lives in this process: constrained requests are decoded here.
        # The choice counts at once (a reservation), so a burst of requests spreads over the copies.
        replica = self._route() if sampling.structured is None else None
        if replica is not None:
            replica.reserved += 1
        else:
            self.local_load += 1
        try:
            prepared, features, constraint = await self._prepare(request, prompt, args, replica is None)
        except BaseException:
            if replica is not None:
                replica.reserved -= 1
            else:
                self.local_load -= 1
            raise
        inputs = prepared.inputs
        preprocess_s = time.perf_counter() - prep_start
        image_tokens = self._checked_image_tokens(inputs, prompt, len(images), count)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        job = Job(inputs=inputs, prompt_tokens=prompt_tokens, sampling=sampling, loop=loop, queue=asyncio.Queue())
        job.image_features = features
        job.image_keys = list(prepared.image_keys)
        job.stream = request.stream
        job.constraint = constraint
        if sampling.seed is not None and not sampling.greedy:
            import torch

            job.generator = torch.Generator().manual_seed(sampling.seed)
        rid = None
        if replica is not None and not replica.alive:  # it died while this request was prepared
            replica.reserved -= 1
            replica = None
            self.local_load += 1
            if "pixel_values" in inputs:
                job.image_features = await loop.run_in_executor(None, self.encode_images, inputs, job.image_keys)
        if replica is not None:
            rid = replica.register(job)
            # Pickling a job's tensors (tens of MB for a large image's pixels) stays off the loop.
            sending = loop.run_in_executor(replica.sender, replica.send, rid, job)
            try:
                await asyncio.shield(sending)
            except asyncio.CancelledError:
                sending.add_done_callback(lambda _: replica.cancel(rid))
                raise
        else:
            self.batcher.submit(job)
            self.local_submitted += 1
        try:
            while True:
                item = await job.queue.get()
                if isinstance(item, GenerationChunk):
                    yield item
                    continue
                kind, value = item
                if kind == "error":
                    raise EngineError(f"generation failed: {value}") from value
                break
        except (asyncio.CancelledError, GeneratorExit):
            job.cancelled = True
            if replica is not None:
                replica.cancel(rid)
            raise
        finally:
            if replica is None:
                self.local_load -= 1
        end = time.perf_counter()
        first = job.first_token or end
        timings = Timings(
            queue_s=(job.started or end) - job.submitted,
            preprocess_s=preprocess_s,
            ttft_s=first - start,
            prefill_s=first - (job.started or first),
            decode_s=(job.last_token or first) - first,
            total_s=end - start,
            load_s=self.load_s,
            peak_memory_bytes=peak_memory_bytes(self.device),
            preprocess_cache_hits=prepared.cache_hits,
            stages={
                "template": template_s, **prepared.stages, **job.stages,
                **({"batch_wait": job.started - job.queued} if job.started and job.queued else {}),
            },
        )
        yield GenerationResult(
            text=job.text,
            finish_reason=job.finish_reason or "stop",
            prompt_tokens=prompt_tokens,
            image_tokens=image_tokens,
            completion_tokens=len(job.token_ids),
            timings=timings,
            model=self.model_id,
            engine=self.name,
            logprobs=tuple(job.logprobs or ()) if sampling.logprobs else None,
        )

    @property
    def vocab_size(self) -> int:
        """The width of the model's logits (may exceed the tokenizer's vocabulary)."""
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        width = getattr(head, "out_features", None)
        return int(width) if width else int(self.model.config.get_text_config().vocab_size)

    def _check_logit_bias(self, sampling: SamplingParams) -> None:
        if not sampling.logit_bias:  # most requests: nothing to look up
            return
        vocab = self.vocab_size
        highest = max(token for token, _ in sampling.logit_bias)
        if highest >= vocab:
            raise BadRequestError(f"logit_bias names token {highest}; this model's ids are 0 to {vocab - 1}", param="logit_bias")

    def _compile(self, structured: StructuredOutput) -> Any:
        with self._grammars_lock:
            if self._grammars is None:
                from vlmlab.engines.hf.structured import Grammars

                self._grammars = Grammars(self.tokenizer, self.vocab_size, stop_token_ids=sorted(self.eos_ids))
        return self._grammars.compile(structured)

    def _route(self) -> Any | None:
        """The least-loaded live replica, or None for this process (also on a tie)."""
        live = [r for r in self.replicas if r.alive]
        if not live:
            return None
        best = min(live, key=lambda r: r.load)
        return best if best.load < self.local_load else None

    async def _prepare(self, request: GenerationRequest, prompt: str, args: tuple[Any, ...], here: bool) -> tuple[Any, list[Any] | None, Any]:
        """Preprocessing (and the vision tower when ``here``), the logit-bias check and the
        compiled grammar: ``(prepared, features, constraint)``."""
        loop = asyncio.get_running_loop()
        # Images are real work: off the event loop. Text alone is one tokenizer call, cheaper
        # than the hop to a worker thread.
        if args[1]:
            prepared, features = await loop.run_in_executor(None, self._prepare_and_encode, args, here)
        else:
            prepared, features = self.preprocessor(*args), None
        sampling = request.sampling
        self._check_logit_bias(sampling)
        constraint = None
        if sampling.structured is not None:  # compiled off the loop; a bad schema is a 400 here
            compiled = await loop.run_in_executor(None, self._compile, sampling.structured)
            constraint = self._grammars.constraint(compiled)
        return prepared, features, constraint

    def _prepare_and_encode(self, args: tuple[Any, ...], here: bool = True) -> tuple[Any, list[Any] | None]:
        """Preprocess, then (where the model takes precomputed encoder outputs) run the vision
        tower here, in the worker thread: it then overlaps the batch worker's decode steps
        instead of stalling them inside a prefill. Returns the inputs (without pixels when
        encoded) and the per-image features.

        ``here`` false: the request decodes in a replica process, which runs the tower itself on
        its own core (the serving process would otherwise encode for every copy and become the
        bottleneck: about 45 ms per nano image at 16 concurrent). Only images all found in the
        encoder cache are filled in here."""
        prepared = self.preprocessor(*args)
        if not self.encode_ahead or "pixel_values" not in prepared.inputs:
            return prepared, None
        if not here:
            keys = prepared.image_keys
            cached = [self.encoder_cache.get(k) for k in keys] if self.encoder_cache.enabled else []
            if not cached or len(keys) != prepared.inputs["pixel_values"].shape[0] or any(c is None for c in cached):
                return prepared, None
            prepared.inputs.pop("pixel_values")
            prepared.inputs.pop("image_sizes", None)
            return prepared, cached
        start = time.perf_counter()
        features = self.encode_images(prepared.inputs, prepared.image_keys)
        prepared.stages["encode"] = time.perf_counter() - start
        return prepared, features

    def encode_images(self, inputs: dict[str, Any], keys: list[str]) -> list[Any]:
        """The vision tower's per-image features for ``inputs``' pixels (popped from ``inputs``),
        each image looked up by its content key in the encoder cache first."""
        import torch

        pixels, sizes = inputs.pop("pixel_values"), inputs.pop("image_sizes", None)
        # The processor's tensors are on the CPU; the tower is wherever the model is (CUDA, MPS).
        pixels = pixels.to(self.device)

        def encode(index: slice) -> list[Any]:
            with torch.inference_mode():
                out = self.model.model.get_image_features(
                    pixel_values=pixels[index], image_sizes=None if sizes is None else sizes[index], return_dict=True
                )
            return list(out.pooler_output)

        if len(keys) != pixels.shape[0] or not self.encoder_cache.enabled:
            return encode(slice(None))
        features = []  # one image at a time, each looked up first: a repeated image skips the tower
        for i, key in enumerate(keys):
            found, claimed = self.encoder_cache.get_or_claim(key)  # one encode per image in flight
            try:
                if found is None:
                    found = encode(slice(i, i + 1))[0]
                    self.encoder_cache.put(key, found)
            finally:
                if claimed:
                    self.encoder_cache.release(key)
            features.append(found)
        return features

    def _checked_image_tokens(self, inputs: Mapping[str, Any], prompt: str, n_images: int, count: PromptCount) -> int:
        """The processor's real expansion; warn when the family rule disagrees."""
        if not n_images:
            return 0
        expanded = int(inputs["input_ids"].shape[1])
        if self.family is None:
            return count.image_tokens
        text = len(self.prompts.encode(prompt))
        placeholder = len(self.tokenizer(self.preprocessor.placeholder, add_special_tokens=False)["input_ids"])
        actual = expanded - text + placeholder * n_images
        if actual != count.image_tokens:
            self.expansion_mismatches += 1
            logger.warning(
                "%s: the processor expanded %d image(s) to %d tokens, the %s rule says %d",
                self.model_id, n_images, actual, self.family.name, count.image_tokens,
            )
        return actual

    def _run_batch(self, jobs: list[Any]) -> None:
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        from vlmlab.engines.hf.batching import RowSampler, RowTracker, start_batch

        batch = start_batch(jobs, self.pad_id, self.device, self.model.dtype)
        longest = max(j.sampling.max_tokens for j in jobs)
        room = self.max_model_len - batch["input_ids"].shape[1]
        tracker = RowTracker(
            jobs,
            self.decode_ids,
            self.eos_ids,
            on_step=self.batcher.mark_progress,
            pieces=self.pieces,
        )
        with torch.inference_mode():
            self.model.generate(
                **batch,
                max_new_tokens=max(1, min(longest, room)),
                do_sample=False,
                logits_processor=LogitsProcessorList([RowSampler(jobs, self.eos_ids)]),
                stopping_criteria=StoppingCriteriaList([tracker]),
                pad_token_id=self.pad_id,
            )
        self.batcher.aborted_total += tracker.aborted
        for job in jobs:
            if job.finish_reason is None:  # ran out of context room before max_tokens
                job.finish_reason = "length"
            RowTracker._stream(job)
            job.emit(("done", job.finish_reason))

    # -- info ----------------------------------------------------------------------------------

    def info(self) -> EngineInfo:
        return EngineInfo(
            engine=self.name,
            model=self.model_id,
            family=self.family.name if self.family else None,
            max_model_len=self.max_model_len,
            max_images=self.max_images,
            device=self.device,
            dtype=self.dtype,
            load_s=self.load_s,
            details={
                "running": self.batcher.running,
                "waiting": self.batcher.waiting,
                "max_batch_size": self.spec.max_batch_size,
                "batching": "continuous" if self.continuous else "static",
                **self._replica_details(),
            },
        )

    @staticmethod
    def _threads() -> int:
        import torch

        return torch.get_num_threads()

    def _replica_details(self) -> dict[str, Any]:
        if not self.replicas:
            return {"data_parallel_size": 1, "copies_reason": self.copies_reason, "torch_threads": self._threads()}
        return {
            "data_parallel_size": 1 + len(self.replicas),
            "copies_reason": self.copies_reason,
            "torch_threads": self._threads(),
            "replicas": [{"index": 0, "alive": True, "load": self.local_load, "requests": self.local_submitted}]
            + [
                {"index": r.index, "alive": r.alive, "load": r.load, "requests": r.submitted, **({} if r.alive else {"problem": r.problem})}
                for r in self.replicas
            ],
        }

    def health(self, hung_after_s: float = 120.0) -> tuple[bool, str]:
        """Dead when the batch thread is gone; hung when it holds work and made no progress."""
        if not self.batcher.alive():
            return False, "the batch worker thread died"
        stalled = time.monotonic() - self.batcher.last_progress
        if self.batcher.running and stalled > hung_after_s:
            return False, f"no decoding progress for {stalled:.0f} s with {self.batcher.running} running"
        return True, "ok"

    def close(self) -> None:
        for replica in self.replicas:
            replica.close()
        self.batcher.close()


def load_replica(spec: EngineSpec) -> HFEngine:
    """A data-parallel replica's copy of the model, loaded in the replica process. Handed to
    :func:`~vlmlab.engines.hf.replicas.start_replicas` rather than imported there: the engine
    imports the replicas module, so it must not import the engine back."""
    return HFEngine.load(spec, replica=True)


# A copy of an hf model is a whole Python process with torch: about this much beside its weights.
_PROCESS_BYTES = 700 * 2**20
# Up to here (fp32 bytes: 100M parameters) a model is dispatch-bound on a CPU: copies beat threads.
_SMALL_WEIGHTS = 400 * 2**20


def _copy_plan(spec: EngineSpec, source: str, family: Family | None, device: str) -> CopyPlan:
    """``spec.data_parallel_size``, or for ``"auto"`` the copies :func:`plan_copies` chooses from
    the checkpoint's weight files (or its family record's parameter count)."""
    if spec.data_parallel_size != "auto":
        return CopyPlan(int(spec.data_parallel_size), None, "as asked (--data-parallel-size)")
    weights = folder_weight_bytes(source)
    if weights is None and family is not None:
        try:
            weights = family.checkpoint(source).weight_bytes("fp32")
        except VlmlabError:
            weights = None
    return plan_copies(weights, on_gpu=device != "cpu", per_copy_bytes=_PROCESS_BYTES + (weights or 0), small_bytes=_SMALL_WEIGHTS)
