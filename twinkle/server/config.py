"""The server's YAML configuration: a strict schema (an unknown key is an error naming the key and where).

Example (see ``docs/server.md`` for every key)::

    http: {host: 0.0.0.0, port: 8000}
    persistence: {sqlite_path: ~/.twinkle/server.db, checkpoint_root: ~/.twinkle/checkpoints}
    lease_seconds: 60
    models:
      - name: tiny
        backend: transformers
        model_id: builtin://tiny
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from twinkle.types import InvalidInputError
from twinkle.types.params import MAX_LORA_RANK

from .telemetry.config import TelemetryConfig

__all__ = [
    "AuthConfig",
    "ConfigError",
    "HttpConfig",
    "LimitsConfig",
    "MegatronSettings",
    "ModelConfig",
    "PersistenceConfig",
    "RayActorOptions",
    "SamplerSettings",
    "SchedulerSettings",
    "ServerConfig",
    "dump_config",
    "expand_env",
    "load_config",
    "parse_config",
]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:-]*$")
_BUILTIN_BACKENDS = ("transformers", "megatron", "mock")
_CUSTOM_BACKEND_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")


class ConfigError(InvalidInputError):
    """The configuration file is missing, not YAML, or does not match the schema."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class HttpConfig(_Strict):
    host: str = Field("0.0.0.0", description="interface the HTTP proxy binds to")
    port: int = Field(8000, ge=1, le=65535)
    proxy: Literal["auto", "direct", "haproxy", "serve"] = Field(
        "auto",
        description="HTTP ingress: 'direct' (the gateway replica's own HTTP server listens on http.port: no proxy "
        "hop, no HAProxy processes; on a local Ray Serve then runs no proxy actor at all), 'haproxy' (Ray Serve's HAProxy ingress in front of the gateway replica's own "
        "HTTP server; Linux, shipped with ray[serve]), 'serve' (Ray Serve's Python proxy actor); 'auto': direct on "
        "a local Ray, haproxy on an existing cluster (--address)",
    )


class AuthConfig(_Strict):
    bootstrap_key_env: str | None = Field(
        "TWINKLE_BOOTSTRAP_KEY",
        description="name of an environment variable; when set at launch, its value is accepted as an admin key",
    )
    bootstrap_user: str = Field("admin", description="user the bootstrap key belongs to")


class PersistenceConfig(_Strict):
    sqlite_path: str = Field("~/.twinkle/server.db", description="SQLite file: keys, sessions, runs, checkpoints, futures")
    checkpoint_root: str = Field("~/.twinkle/checkpoints", description="checkpoints live in <root>/<user>/<run>/<kind>/<name>")
    future_ttl_seconds: float = Field(3600.0, gt=0, description="how long completed future results are kept")

    def sqlite_file(self) -> Path:
        return Path(os.path.expanduser(self.sqlite_path)).resolve()

    def checkpoint_dir(self) -> Path:
        return Path(os.path.expanduser(self.checkpoint_root)).resolve()


class LimitsConfig(_Strict):
    max_adapters_per_user: int = Field(8, ge=1, description="active runs (loaded adapters) one user may hold")
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="largest HTTP request body")
    max_decoding_bytes: int | None = Field(
        None, ge=1024, description="bytes of request bodies over 1 MiB received and decoded at once (default 4 x "
        "max_request_bytes; one API key at most half): beyond it a large request waits up to 5 s, then 429")
    max_tokens_per_request: int = Field(65536, ge=1, description="tokens in one forward/forward_backward/sample")

    def decoding_bytes(self) -> int:
        """``max_decoding_bytes``, or four bodies of the largest size; never less than two (one per key)."""
        if self.max_decoding_bytes is not None:
            return max(int(self.max_decoding_bytes), 2 * self.max_request_bytes)
        return 4 * self.max_request_bytes


class RayActorOptions(_Strict):
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    memory: int | None = Field(None, ge=0, description="bytes of RAM to reserve")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources")

    def to_ray(self) -> dict[str, Any]:
        out: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory:
            out["memory"] = self.memory
        if self.resources:
            out["resources"] = dict(self.resources)
        return out


class SamplerSettings(_Strict):
    max_tokens: int = Field(1024, ge=1, description="cap on sampling_params.max_tokens")
    default_max_tokens: int = Field(64, ge=1, description="used when a request gives no max_tokens")
    max_num_samples: int = Field(16, ge=1, description="cap on num_samples of one request")
    max_batch_size: int = Field(32, ge=1, description="sample requests decoding together (continuous batching)")


class SchedulerSettings(_Strict):
    """The per-replica scheduler's knobs (``docs/scheduler.md``). The worker and the scheduler take their
    defaults from here: this class is the one place they are written."""

    batch_token_budget: int = Field(8192, ge=1, description="tokens in one mixed batch; a larger request runs alone, in micro-batches of this size")
    max_batch_items: int = Field(256, ge=1, description="requests in one mixed batch")
    seq_grace_s: float = Field(2.0, ge=0, le=3600, description="how long a request whose seq_id is ahead waits "
                               "for the missing ones before the sequence moves on")
    max_pending_per_adapter: int = Field(64, ge=1, description="queued requests of one run before 429")
    max_queue: int = Field(1024, ge=1, description="queued requests per replica before 429 + Retry-After")
    result_memory: int = Field(32, ge=1, description="results kept per run to answer a repeated seq_id")
    sample_token_budget: int = Field(65536, ge=1, description="KV-cache budget of the continuous sampler: requests "
                                     "decoding together hold at most this many tokens, num_samples * (prompt + "
                                     "max_tokens) each; more queue fairly across runs")
    sampler_cache_size: int = Field(4, ge=1, description="saved checkpoints kept loaded for sampling (LRU)")
    history: int = Field(32, ge=1, description="recent batches the worker status shows")
    prefill_chunk: int = Field(512, ge=1, description="prompt tokens prefilled per decode step of the "
                               "continuous sampler")
    prefix_cache_tokens: int = Field(8192, ge=0, le=2**24, description="cached positions of finished sequences the "
                                     "continuous sampler keeps so that a later prompt of the same adapter and "
                                     "weights that starts with one prefills only the rest (multi-turn rollouts: "
                                     "size it to the live conversations' total length, e.g. 256 episodes of 800 "
                                     "tokens ~ 200000; each position costs what the running KV cache does); 0: off")
    sample_slice_s: float = Field(0.05, ge=0, le=60, description="least decode time before training that waits "
                                  "in the same tick runs")
    train_slice_s: float = Field(0.1, ge=0, le=60, description="while sampling is active, a training batch runs "
                                 "in micro-batches of about this long with decode steps between them (0: never "
                                 "split for sampling)")
    concurrent_sampling: bool = Field(True, description="sample on a thread of its own, beside training (the "
                                      "transformers backend without gradient checkpointing); false: one thread, "
                                      "training interleaved in slices (train_slice_s)")
    training_nice: int = Field(5, ge=0, le=19, description="with concurrent_sampling: how much lower the OS "
                               "scheduling priority of the training thread is than the sampler's (Linux nice "
                               "steps); when the cores are contended a new sample's prefill gets the CPU first. "
                               "0: equal")


class MegatronSettings(_Strict):
    tensor_parallel_size: int = Field(1, ge=1, description="ranks a layer's weights are split over (divides heads)")
    data_parallel_size: int = Field(1, ge=1, description="ranks the batch rows are split over")
    pipeline_parallel_size: int = Field(1, ge=1, description="only 1 is supported")
    launcher: Literal["auto", "ray", "process"] = Field(
        "auto", description="how a replica starts its other ranks: Ray actors (inside Ray) or local processes")
    rank_num_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves for each extra rank")
    kv_cache: bool = Field(True, description="sample with megatron's KV cache (False: recompute each step)")


class ModelConfig(_Strict):
    name: str | None = Field(None, description="the base_model name clients use; default: model_id")
    backend: str = Field(description="transformers | megatron | mock, or 'package.module:Class' naming a "
                         "twinkle.model.base.Backend subclass (docs/models.md, custom backends)")
    model_id: str = Field(description="builtin://tiny, hf://org/name, ms://org/name or a local directory")
    replicas: int = Field(1, ge=1, description="worker deployments of this model (each holds its own adapters)")
    placement: Literal["auto", "gateway", "replica"] = Field(
        "auto", description="where the worker runs on Ray Serve: 'gateway' (inside the gateway replica: no "
        "gateway -> worker hop, one process less), 'replica' (its own worker deployment(s), isolated from the "
        "gateway), 'auto' (gateway when this is the server's only model, with one replica, not megatron)")
    ray_actor_options: RayActorOptions = Field(default_factory=RayActorOptions)
    max_adapters: int = Field(16, ge=1, description="adapters loaded at once on ONE replica")
    max_lora_rank: int = Field(64, ge=1, le=MAX_LORA_RANK, description="larger LoRA ranks answer 413")
    max_tokens_per_request: int = Field(8192, ge=1, description="tokens in one request to this model")
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    batch_token_budget: int | None = Field(None, ge=1, exclude=True,
                                           description="older spelling of scheduler.batch_token_budget")
    max_queue: int | None = Field(None, ge=1, exclude=True, description="older spelling of scheduler.max_queue")
    sampler: SamplerSettings = Field(default_factory=SamplerSettings)
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    attn_implementation: str | None = Field(None, description="transformers backend: sdpa (default; eager where a "
                                            "model refuses it), eager, flash_attention_2, ...")
    gradient_checkpointing: bool = Field(False, description="transformers backend: recompute layers in backward")
    packing: bool = Field(True, description="transformers backend: datums of one adapter share rows in training "
                          "and forward passes (no padding waste; same results)")
    autocast: Literal["bfloat16", "float16"] | None = Field(None, description="transformers backend: mixed "
                                                            "precision forward passes on CUDA (ignored on CPU)")
    sample_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="transformers backend: precision of sampling passes of a float32 model. float32: "
        "exact (sampled logprobs equal a forward pass); bfloat16: bfloat16 base weights (CPU with oneDNN/AMX, or "
        "CUDA autocast), sampling ~1.2-1.3x faster on an AMX CPU, logprobs off by ~1e-2 (docs/scheduler.md)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    seed: int = 0
    trust_remote_code: bool = False
    megatron: MegatronSettings = Field(default_factory=MegatronSettings,
                                       description="megatron backend options (parallel sizes; docs/megatron.md)")

    backend_options: dict[str, Any] = Field(
        default_factory=dict, description="passed verbatim to a custom backend's constructor (module:Class only)")

    @model_validator(mode="after")
    def _default_name(self) -> ModelConfig:
        if self.name is None:
            # A local directory (``/models/qwen``) is not a valid name: its last component is (``qwen``).
            # The name is validated here, not first in the gateway replica (where it re-reads this config).
            name = self.model_id.rstrip("/")
            if not _NAME_RE.match(name):
                name = os.path.basename(os.path.normpath(os.path.expanduser(name)))
            if not _NAME_RE.match(name):
                raise ValueError(
                    f"model_id {self.model_id!r} does not make a valid model name: set 'name' (letters, digits "
                    "and . _ / : -), the base_model clients pass")
            object.__setattr__(self, "name", name)
        return self

    @model_validator(mode="after")
    def _flat_scheduler_keys(self) -> ModelConfig:
        """``batch_token_budget`` / ``max_queue`` at the model's top level (older configs) go into ``scheduler``."""
        for key in ("batch_token_budget", "max_queue"):
            flat = getattr(self, key)
            if flat is None:
                continue
            if key in self.scheduler.model_fields_set and getattr(self.scheduler, key) != flat:
                raise ValueError(f"{key} and scheduler.{key} disagree; keep scheduler.{key} only")
            setattr(self.scheduler, key, flat)
            object.__setattr__(self, key, None)
        return self

    @field_validator("backend")
    @classmethod
    def _check_backend(cls, v: str) -> str:
        if v in _BUILTIN_BACKENDS or _CUSTOM_BACKEND_RE.match(v):
            return v
        raise ValueError(f"backend is one of {', '.join(_BUILTIN_BACKENDS)} or 'package.module:ClassName'")

    @model_validator(mode="after")
    def _sample_dtype_where_it_applies(self) -> ModelConfig:
        if self.sample_dtype != "float32" and self.backend in ("megatron", "mock"):
            raise ValueError(f"sample_dtype is a transformers backend setting; the {self.backend} backend samples "
                             "in its model's dtype")
        return self

    @model_validator(mode="after")
    def _options_for_custom_only(self) -> ModelConfig:
        if self.backend_options and self.backend in _BUILTIN_BACKENDS:
            raise ValueError("backend_options is for custom backends; set a built-in backend's keys directly "
                             "(megatron: the megatron section)")
        return self

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str | None) -> str | None:
        if v is not None and not _NAME_RE.match(v):
            raise ValueError("a model name uses letters, digits and . _ / : - only")
        return v

    @property
    def served_name(self) -> str:
        return self.name or self.model_id


class ServerConfig(_Strict):
    http: HttpConfig = Field(default_factory=HttpConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    persistence: PersistenceConfig = Field(default_factory=PersistenceConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    lease_seconds: float = Field(60.0, gt=0, description="a session that stops heart-beating this long is unloaded")
    max_lease_seconds: float = Field(86400.0, gt=0, description="cap on a session's requested lease")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig,
                                       description="metrics, traces, JSON logs (docs/observability.md)")
    models: list[ModelConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> ServerConfig:
        seen: set[str] = set()
        for m in self.models:
            if m.served_name in seen:
                raise ValueError(f"two models are named {m.served_name!r}; give each a distinct 'name'")
            seen.add(m.served_name)
        return self

    @model_validator(mode="after")
    def _gateway_placement(self) -> ServerConfig:
        for i, m in enumerate(self.models):
            if m.placement == "gateway" and m.replicas != 1:
                raise ValueError(f"models[{i}]: placement 'gateway' hosts one replica; set replicas: 1 or "
                                 "placement: replica")
        return self

    def in_gateway(self, m: ModelConfig) -> bool:
        """Whether model ``m``'s worker runs inside the gateway replica (``placement``; ``auto``: the only
        model, one replica, not megatron, which starts processes of its own)."""
        if m.placement != "auto":
            return m.placement == "gateway"
        return len(self.models) == 1 and m.replicas == 1 and m.backend != "megatron"

    def model(self, name: str) -> ModelConfig | None:
        for m in self.models:
            if m.served_name == name or m.model_id == name:
                return m
        return None


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<top level>"


def _format_errors(err: ValidationError, source: str) -> tuple[str, str]:
    lines: list[str] = []
    first_field = ""
    for e in err.errors():
        loc = tuple(e.get("loc", ()))
        # drop pydantic's internal discriminator / function tags
        loc = tuple(p for p in loc if not (isinstance(p, str) and p.startswith("function-")))
        if e.get("type") == "extra_forbidden":
            key = loc[-1] if loc else "?"
            where = _loc(loc[:-1])
            lines.append(f"unknown key {key!r} at {where}")
            field = _loc(loc)
        else:
            field = _loc(loc)
            lines.append(f"{field}: {e.get('msg')}")
        first_field = first_field or field
    return f"invalid config {source}: " + "; ".join(lines), first_field


def parse_config(data: Any, source: str = "<dict>") -> ServerConfig:
    """Validate a mapping. Raises ``ConfigError`` naming the bad key and its location."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: the top level must be a mapping", field="<top level>")
    try:
        return ServerConfig.model_validate(data)
    except ValidationError as e:
        msg, field = _format_errors(e, source)
        raise ConfigError(msg, field=field) from None


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(data: Any, where: str = "") -> Any:
    """``${NAME}`` and ``${NAME:-default}`` in the string values of a loaded YAML file, from the environment
    (``$`` alone is left as it is). An unset variable without a default is an error naming the key."""
    if isinstance(data, dict):
        return {k: expand_env(v, f"{where}.{k}" if where else str(k)) for k, v in data.items()}
    if isinstance(data, list):
        return [expand_env(v, f"{where}[{i}]") for i, v in enumerate(data)]
    if not isinstance(data, str) or "${" not in data:
        return data

    def one(m: re.Match[str]) -> str:
        value = os.environ.get(m.group(1))
        if m.group(2) is not None and not value:  # as in the shell: the default when unset or empty
            return m.group(2)
        if value is None:
            raise ConfigError(f"{where or '<top level>'}: environment variable {m.group(1)} is not set "
                              f"(write ${{{m.group(1)}:-default}} to give a default)", field=where)
        return value

    return _ENV_REF.sub(one, data)


def load_config(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> ServerConfig:
    """Read and validate a YAML file. ``overrides`` are dotted keys (``{"http.port": 8001}``). String values
    may name environment variables: ``${NAME}`` or ``${NAME:-default}`` (see :func:`expand_env`)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist", field="config")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config {p} is not valid YAML: {e}", field="config") from None
    data = expand_env(data)
    if overrides:
        data = dict(data or {})
        for dotted, value in overrides.items():
            node = data
            parts = dotted.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
    return parse_config(data, source=str(p))


def dump_config(cfg: ServerConfig, fmt: Literal["yaml", "json"] = "yaml") -> str:
    """The full effective configuration (defaults filled in)."""
    data = cfg.model_dump(mode="json")
    if fmt == "json":
        return json.dumps(data, indent=2)
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def model_default(key: str) -> Any:
    """The schema's default of a model key (``max_adapters``, ``max_lora_rank``, ``max_tokens_per_request``):
    what a worker built from a partial dict uses."""
    return ModelConfig.model_fields[key].default


SCHEDULER_DEFAULTS = SchedulerSettings()
SAMPLER_DEFAULTS = SamplerSettings()
