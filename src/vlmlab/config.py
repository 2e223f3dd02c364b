"""Settings objects shared by the CLI, the server and the eval runner.

Environment variables use the ``VLMLAB_`` prefix (``VLMLAB_API_KEY``, ...); the CLI turns flags
into these objects and library code only ever sees the objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from vlmlab.protocol.errors import ConfigError

Device = Literal["auto", "cpu", "cuda", "mps"]
DType = Literal["auto", "bf16", "fp16", "fp32"]


@dataclass(frozen=True)
class EngineSpec:
    """What to load and how.

    Attributes:
        model: ``nano``, a family preset name (``qwen2_vl``), a hub id or a local checkpoint path.
        engine: backend name (``hf``, ``vllm``, ``mlx``, ``remote``).
        device, dtype: where and at which precision to run (``auto`` picks per machine).
        trust_remote_code: allow the checkpoint's own Python code (Phi-3.5-vision needs it).
        revision: hub revision (branch, tag or commit).
        max_batch_size: requests decoded together.
        data_parallel_size: copies of the model decoding side by side (hf: the extra copies in
            processes of their own; llamacpp: contexts on threads of their own), or ``"auto"``:
            chosen at load from the weights' size, the device and the cores
            (:mod:`vlmlab.engines.copies`).
        max_model_len: context limit to enforce; default: the model's.
        processor_options: defaults for the processor (``num_crops``, ``max_pixels``...).
        preprocess_cache_bytes: budget of the content-addressed cache of processed images
            (0 turns it off).
        extra: backend-specific settings (vLLM's ``tokenizer_mode``, remote ``base_url``...).
    """

    model: str = "nano"
    engine: str = "hf"
    device: Device = "auto"
    dtype: DType = "auto"
    trust_remote_code: bool = False
    revision: str | None = None
    max_batch_size: int = 16
    data_parallel_size: int | str = 1  # or "auto": chosen at load (vlmlab.engines.copies)
    max_model_len: int | None = None
    processor_options: Mapping[str, Any] = field(default_factory=dict)
    preprocess_cache_bytes: int = 256 * 2**20
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda", "mps"):
            raise ConfigError(f"unknown device {self.device!r}; use auto, cpu, cuda or mps")
        if self.dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise ConfigError(f"unknown dtype {self.dtype!r}; use auto, bf16, fp16 or fp32")
        if self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        object.__setattr__(self, "data_parallel_size", parse_data_parallel_size(self.data_parallel_size))


def parse_data_parallel_size(value: object) -> int | str:
    """``"auto"`` or a whole number >= 1 (a flag's text, a config file's value, or code's).

    Raises:
        ConfigError: anything else, naming the value.
    """
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        if text.isdigit():
            value = int(text)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ConfigError(f"data_parallel_size must be a whole number >= 1 or auto, got {value!r}", param="data_parallel_size")


def model_target(text: str, **defaults: Any) -> tuple[str, EngineSpec]:
    """``(label, spec)`` for a model as a user writes it: ``URL#model`` is that model on an
    OpenAI-compatible server (remote engine), ``engine:model`` that engine, anything else the
    default engine (``defaults`` are further EngineSpec fields)."""
    text = text.strip()
    if text.startswith(("http://", "https://")):
        url, _, model = text.partition("#")
        return text, EngineSpec(model=model or "default", engine="remote", extra={"base_url": url})
    engine, sep, model = text.partition(":")
    if sep and engine in ("hf", "vllm", "mlx", "remote", "transformers", "llamacpp", "mistral") and model:
        return text, EngineSpec(model=model, engine=engine, **defaults)
    return text, EngineSpec(model=text, **defaults)


@dataclass(frozen=True)
class ServedModel:
    """A further model of a server that serves several: the id clients send, its engine chain."""

    name: str
    engines: tuple[EngineSpec, ...]


@dataclass(frozen=True)
class RaySettings:
    """``vlmlab serve --ray``: the model's replicas as a Ray Serve application.

    Attributes:
        address: the cluster (``auto``, ``ray://host:10001``; ``None``: start a local one).
        replicas: copies of the model, each with its own engine chain and caches (a fixed
            number; ``min_replicas``/``max_replicas`` make it autoscale instead).
        num_cpus, num_gpus: what one replica reserves (``num_gpus: 1`` puts each on its own GPU;
            the vLLM engine's tensor parallelism runs inside one replica).
        min_replicas, max_replicas, target_ongoing_requests: Ray Serve autoscaling bounds and
            the requests in flight per replica it aims at.
        router: ``affinity`` (a request whose image was seen goes to the replica that holds
            its preprocessed image) or ``default`` (Ray Serve's power-of-two choices).
        affinity_imbalance: how many more requests in flight the replica holding an image may
            have than the least busy one before the request goes elsewhere.
        max_ongoing_requests: requests one replica takes at once (Ray queues the rest).
    """

    address: str | None = None
    replicas: int = 2
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float = 8.0
    router: str = "affinity"
    affinity_imbalance: int = 4
    max_ongoing_requests: int = 64

    def __post_init__(self) -> None:
        if self.router not in ("affinity", "default"):
            raise ConfigError(f"ray.router must be 'affinity' or 'default', got {self.router!r}")
        if self.replicas < 1 or self.max_ongoing_requests < 1:
            raise ConfigError(f"ray.replicas and ray.max_ongoing_requests must be at least 1, got {self.replicas} and {self.max_ongoing_requests}")
        if self.affinity_imbalance < 0 or self.num_cpus < 0 or self.num_gpus < 0:
            raise ConfigError("ray.affinity_imbalance, ray.num_cpus and ray.num_gpus must be >= 0")
        low, high = self.min_replicas, self.max_replicas
        if (low is None) != (high is None) or (low is not None and not 0 <= low <= high >= 1):  # type: ignore[operator]
            raise ConfigError(f"ray.min_replicas and ray.max_replicas go together, 0 <= min <= max, max >= 1; got {low} and {high}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RaySettings:
        """From a config file's ``ray:`` section; an unknown key is named with the valid ones."""
        if not isinstance(values, Mapping):
            raise ConfigError(f"ray: a mapping of Ray settings, got {values!r}")
        known = set(cls.__dataclass_fields__)
        unknown = set(values) - known
        if unknown:
            raise ConfigError(f"unknown ray setting(s) {sorted(unknown)}. Valid: {sorted(known)}")
        return cls(**values)


@dataclass(frozen=True)
class ServerSettings:
    """Everything ``vlmlab serve`` needs; built from flags, a YAML/JSON ``--config`` and env.

    Attributes:
        engines: the fallback chain, tried in order at start-up and on run-time failure.
        served_model_name: the id clients send and ``/v1/models`` lists (default: the model).
        models: further models served beside that one, each with its own engine chain and
            caches; a request's ``model`` field picks one (none: the first model).
        api_key: Bearer token required on ``/v1/*`` and ``/tokenize`` (``VLMLAB_API_KEY``).
        allowed_local_media_path: root under which ``file://`` image URLs may be read.
        allowed_media_domains: http(s) host allow-list (``None``: any public host).
        trusted_media_hosts: hosts exempt from the private-address guard (tests, internal hosts).
        max_images: images per request (default: the family's limit).
        max_image_bytes, max_image_pixels: per-image caps, checked before decoding
            (``max_image_pixels`` ``None``: from the served family, see
            ``vlmlab.server.admission.default_pixel_cap``; JPEGs over it are decoded reduced).
        max_concurrency: requests handed to the engine at once (the engine batches them).
        max_queue: requests allowed to wait beyond those; more get 429 with Retry-After.
        request_timeout_s: per-request deadline (504 after it).
        response_cache_entries: deterministic answers kept (0 turns the cache off).
        response_cache_bytes: and the bytes they may take together (their texts, token ids and
            metadata), so long answers cannot grow the cache past it.
        media_workers: threads that decode images (and read inline ones) off the event loop.
        preprocess_mode: image preprocessing a request gets unless its ``mm_processor_kwargs``
            say ``preprocess_mode``: ``exact`` (equal to the model's processor) or ``fast``.
        preprocess_workers: processes that decode and preprocess large images from their bytes,
            where the engine runs its images through vlmlab.preprocess (``None``: one per core;
            0: off, images are decoded in ``media_workers`` threads and preprocessed by the engine).
        preprocess_pool_min_bytes: images at least this large (encoded) go to those processes;
            smaller ones cost less to preprocess than to ship.
        default_max_tokens: completion length when a request sets none.
        engine_failures_before_fallback: consecutive engine errors that hand over to the next.
        max_request_bytes: request bodies larger than this are refused with 413 before they are
            read (the API key is checked first, so no unauthenticated body is read at all).
        auth_stats: ``/stats`` and ``/metrics`` need the API key too.
        image_memory_budget: bytes that the decoded images and tensors of all in-flight
            requests may take, estimated from each image's header before decoding; a request
            needing more than all of it gets 413, one that does not fit now 429.
        fetch_workers: threads that download http(s) image URLs (apart from the decoding
            threads, so slow hosts cannot hold up inline images).
        fetch_per_host: downloads from any one host at once (the rest wait without a thread).
        http_header_timeout_s: a connection must deliver a request's headers within this
            long (of opening, or of the previous response), or it is closed.
        http_body_timeout_s: a request's body must arrive within this long of its headers.
        http_max_header_bytes: request line and headers larger than this get 431.
        ray: replicas on a Ray cluster (``vlmlab serve --ray``); ``None``: this process serves.
    """

    engines: tuple[EngineSpec, ...] = (EngineSpec(),)
    models: tuple[ServedModel, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    api_key: str | None = None
    allowed_local_media_path: str | None = None
    allowed_media_domains: tuple[str, ...] | None = None
    trusted_media_hosts: tuple[str, ...] = ()
    max_images: int | None = None
    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int | None = None
    max_concurrency: int = 16
    max_queue: int = 64
    request_timeout_s: float = 300.0
    response_cache_entries: int = 1024
    response_cache_bytes: int = 64 * 2**20
    media_workers: int = 4
    preprocess_mode: str = "exact"
    preprocess_workers: int | None = None
    preprocess_pool_min_bytes: int = 256 * 2**10
    default_max_tokens: int = 256
    engine_failures_before_fallback: int = 3
    # Room for the default image limits as base64 data URLs (4/3 of the bytes) in one request.
    max_request_bytes: int = 128 * 2**20
    auth_stats: bool = False
    image_memory_budget: int = 2 * 2**30
    fetch_workers: int = 32
    fetch_per_host: int = 8
    http_header_timeout_s: float = 10.0
    http_body_timeout_s: float = 60.0
    http_max_header_bytes: int = 32 * 2**10
    ray: RaySettings | None = None

    def __post_init__(self) -> None:
        if not self.engines:
            raise ConfigError("at least one engine is needed")
        for name in ("max_concurrency", "media_workers", "engine_failures_before_fallback"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.preprocess_mode not in ("exact", "fast"):
            raise ConfigError(f"preprocess_mode must be 'exact' or 'fast', got {self.preprocess_mode!r}")
        if (self.preprocess_workers is not None and self.preprocess_workers < 0) or self.preprocess_pool_min_bytes < 0:
            raise ConfigError("preprocess_workers and preprocess_pool_min_bytes must be >= 0")
        for name in ("image_memory_budget", "fetch_workers", "fetch_per_host"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.http_max_header_bytes < 1024:  # the request line and a Host header need room
            value = self.http_max_header_bytes
            raise ConfigError(f"http_max_header_bytes must be at least 1024, got {value}")
        if self.max_image_pixels is not None and self.max_image_pixels < 1:
            raise ConfigError(f"max_image_pixels must be at least 1, got {self.max_image_pixels}")
        if not (self.http_header_timeout_s > 0 and self.http_body_timeout_s > 0):
            raise ConfigError("http_header_timeout_s and http_body_timeout_s must be > 0")
        if self.max_request_bytes < 1:
            raise ConfigError(f"max_request_bytes must be at least 1, got {self.max_request_bytes}")
        if self.max_queue < 0 or self.request_timeout_s <= 0:
            raise ConfigError("max_queue must be >= 0 and request_timeout_s > 0")

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.engines[0].model

    def each_model(self) -> list[ServerSettings]:
        """One ServerSettings per served model (the first is these settings' own model), each
        with its own engines and name and no further models."""
        first = replace(self, models=())
        return [first, *(replace(first, engines=m.engines, served_model_name=m.name) for m in self.models)]


# -- config files ----------------------------------------------------------------------------------

_ENGINE_KEYS = {f for f in EngineSpec.__dataclass_fields__}
_SERVER_KEYS = {f for f in ServerSettings.__dataclass_fields__} - {"engines", "models"}
_BYTE_KEYS = {
    "preprocess_cache_bytes",
    "max_image_bytes",
    "preprocess_pool_min_bytes",
    "max_request_bytes",
    "image_memory_budget",
    "http_max_header_bytes",
}
# Shipped presets, found through importlib.resources so an installed wheel has them too.
PRESET_DIR = Path(str(resources.files("vlmlab") / "configs"))


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def read_config_file(name_or_path: str) -> dict[str, Any]:
    """A YAML or JSON config: a path, or the name of a shipped preset (``phi-3.5-vision``)."""
    import json

    import yaml

    path = Path(name_or_path).expanduser()
    if not path.exists():
        preset = PRESET_DIR / f"{name_or_path}.yaml"
        if not preset.exists():
            raise ConfigError(
                f"config {name_or_path!r} is neither a file nor a preset. Presets: {', '.join(preset_names())}"
            )
        path = preset
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot parse {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings, got {type(data).__name__}")
    return data


def read_json_schema(path: str | Path, flag: str) -> dict[str, Any]:
    """A JSON Schema file named by a command-line ``flag`` (``--json-schema``, ``--answer-schema``).

    Returns:
        The schema (a JSON object).

    Raises:
        ConfigError: one line naming the flag, the file and the problem (missing, unreadable,
            not JSON, not an object).
    """
    import json

    where = f"{flag} {path}"
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: cannot read it ({exc.__class__.__name__}: {exc})") from None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(schema, dict):
        raise ConfigError(f"{where}: a JSON Schema is a JSON object, got a {type(schema).__name__}") from None
    return schema


def _byte_value(key: str, value: Any) -> int:
    if isinstance(value, str):
        from vlmlab.units import parse_bytes

        return parse_bytes(value)
    if not isinstance(value, int):
        raise ConfigError(f"{key} must be a number of bytes or a size like 256MiB, got {value!r}")
    return value


def _engine_spec(values: Mapping[str, Any], where: str) -> EngineSpec:
    unknown = set(values) - _ENGINE_KEYS
    if unknown:
        raise ConfigError(f"unknown engine setting(s) {sorted(unknown)} in {where}. Valid: {sorted(_ENGINE_KEYS)}")
    clean = {k: (_byte_value(k, v) if k in _BYTE_KEYS else v) for k, v in values.items()}
    return EngineSpec(**clean)


def server_settings(config: Mapping[str, Any] | None = None, **overrides: Any) -> ServerSettings:
    """Settings from a config mapping (file contents) with CLI ``overrides`` on top (``None``
    values are ignored). ``engine`` may be ``"vllm,hf"`` or a list; ``engines`` may list
    per-engine settings that override the top-level engine settings.

    Raises:
        ConfigError: naming an unknown key or a bad value.
    """
    merged: dict[str, Any] = dict(config or {})
    merged.update({k: v for k, v in overrides.items() if v is not None})
    per_engine = merged.pop("engines", None)
    more = merged.pop("models", None) or ()
    known = _ENGINE_KEYS | _SERVER_KEYS
    unknown = set(merged) - known
    if unknown:
        raise ConfigError(f"unknown setting(s) {sorted(unknown)}. Valid: {sorted(known)}")
    engine_defaults = {k: merged.pop(k) for k in list(merged) if k in _ENGINE_KEYS}
    names = engine_defaults.pop("engine", "hf")
    if per_engine is None or "engine" in overrides and overrides["engine"] is not None:
        names = names.split(",") if isinstance(names, str) else list(names)
        per_engine = [{"engine": n.strip()} for n in names if n.strip()]
    if not isinstance(per_engine, list) or not per_engine:
        raise ConfigError("engines must be a non-empty list of engine settings")
    specs = tuple(_engine_spec({**engine_defaults, **entry}, f"engines[{i}]") for i, entry in enumerate(per_engine))
    server = {k: (_byte_value(k, v) if k in _BYTE_KEYS else v) for k, v in merged.items()}
    for key in ("allowed_media_domains", "trusted_media_hosts"):
        if isinstance(server.get(key), str):
            server[key] = tuple(h.strip() for h in server[key].split(",") if h.strip())
        elif server.get(key) is not None:
            server[key] = tuple(server[key])
    if isinstance(server.get("ray"), Mapping):
        server["ray"] = RaySettings.from_mapping(server["ray"])
    models = tuple(_served_model(entry, engine_defaults, f"models[{i}]") for i, entry in enumerate(more))
    names = [server.get("served_model_name") or specs[0].model, *(m.name for m in models)]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"model names must differ, {twice} is given more than once; set served_model_name / name")
    return ServerSettings(engines=specs, models=models, **server)


def _served_model(entry: Any, defaults: Mapping[str, Any], where: str) -> ServedModel:
    """A further model: ``"nano"``, ``"URL#model"``, ``"vllm:model"``, or a mapping of engine
    settings with an optional ``name``."""
    base = {k: v for k, v in defaults.items() if k not in ("model", "engine")}
    if isinstance(entry, str):
        label, spec = model_target(entry)
        if spec.engine != "remote":
            spec = _engine_spec({**base, "model": spec.model, "engine": spec.engine}, where)
        return ServedModel(spec.model if spec.engine == "remote" else label, (spec,))
    if not isinstance(entry, Mapping) or "model" not in entry:
        raise ConfigError(f"{where}: a model name / URL#model, or settings with a 'model' key")
    fields = dict(entry)
    name = fields.pop("name", None) or fields["model"]
    engines = str(fields.pop("engine", "hf"))
    specs = tuple(_engine_spec({**base, **fields, "engine": e.strip()}, where) for e in engines.split(",") if e.strip())
    return ServedModel(str(name), specs)
