"""The one settings object: read once at start (env, optional TOML file), then passed down.

Environment variables use the `TOKENPOOL_` prefix and `__` for nesting
(`TOKENPOOL_MODELS__SUMMARY__N_CTX=1024`); `REDIS_URL` is accepted as well as
`TOKENPOOL_REDIS_URL`. `TOKENPOOL_CONFIG` names an optional TOML file with the same fields.
Models named in env or file are merged over the built-in registry; `enabled = false` drops one.
"""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

BUNDLED_GEMMA = "bundled:gemma3-270m"
BUNDLED_MINILM = "bundled:all-minilm-l6-v2"
# `enabled` is read before the model is validated, so "false" from the environment (a string)
# must be parsed as pydantic parses a bool field, not tested for truth.
_BOOL = TypeAdapter(bool)


def _enabled(spec: dict[str, Any]) -> bool:
    """False only for a value pydantic reads as false; nonsense stays, for ModelSpec to refuse
    naming the field."""
    try:
        return _BOOL.validate_python(spec.get("enabled", True))
    except ValidationError:
        return True


class ModelSpec(BaseModel):
    """One named model of the registry; a worker serves exactly one."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["llm", "embedding"] = Field(description="llm (llama.cpp) or embedding")
    source: str = Field(
        description="a GGUF path (llm), a sentence-transformers dir (embedding), or bundled:NAME"
    )
    enabled: bool = Field(True, description="false removes a built-in model")
    n_ctx: int = Field(2048, ge=64, le=262_144, description="context window in tokens")
    n_gpu_layers: int = Field(-1, ge=-1, description="layers offloaded to the GPU; -1 all")
    n_threads: int | None = Field(None, ge=1, description="CPU threads; unset: all cores")
    chat_format: str = Field("gemma", description="llama-cpp-python chat format for messages")
    max_tokens: int = Field(1024, ge=1, description="cap on a job's max_tokens")
    max_texts: int = Field(256, ge=1, description="embedding: most texts in one job")
    max_text_chars: int = Field(8192, ge=1, description="embedding: longest text in characters")
    dimensions: int | None = Field(None, ge=1, description="embedding size, if known ahead")
    gpu: str = Field("cpu", pattern=r"^(cpu|\d+)$", description="where `up` pins its worker")
    max_batch: int = Field(
        8, ge=1, le=64, description="jobs one worker runs at once (llm: sequences decoded "
        "together; embedding: jobs gathered into one encode)"
    )
    prompt_chunk_tokens: int | None = Field(
        None, ge=8, le=4096, description="llm: prompt tokens joining jobs add to one step "
        "(batch-invariant: in decodes of at most 63 from each job); unset: 128 on the CPU, "
        "2048 with layers on a GPU (llama-server's batch)"
    )
    batch_wait_ms: float = Field(
        5.0, ge=0, le=1000, description="embedding: how long to gather jobs for one encode"
    )
    keep_alive_s: float | None = Field(
        None, gt=0, description="unload the model after this long without a job and load it "
        "again for the next one (Ollama's keep-alive); unset: stay loaded"
    )
    batch_invariant: bool = Field(
        True, description="llm: a job's tokens never depend on the other jobs in its batch "
        "(CPU; off: a unified KV cache and llama.cpp's fastest kernels, whose rounding changes "
        "with the batch)"
    )
    fast_prefill: bool = Field(
        True, description="llm, batch-invariant on the CPU: prompts run in a second llama.cpp "
        "context on repacked weights (llama.cpp's faster prompt kernels), whole groups of 4 "
        "rows per job, and their cells are copied over (more memory: the repacked weights, "
        "its KV cache)"
    )


def default_models() -> dict[str, ModelSpec]:
    """The registry that needs no files: Gemma 3 270M for text, MiniLM for embeddings."""
    return {
        "chat": ModelSpec(kind="llm", source=BUNDLED_GEMMA, n_ctx=2048, max_tokens=1024),
        # Summaries are mostly prompt: bigger prompt chunks per step (bench/batch: 128 -> 512
        # took 200 documents from 0.86x to 1.38x a plain one-at-a-time loop), and llama.cpp's
        # fastest prompt kernels, which batch invariance gives up (a 504-token prompt: 792 ms
        # vs 974 ms in 63-row chunks).
        "summary": ModelSpec(kind="llm", source=BUNDLED_GEMMA, n_ctx=4096, max_tokens=512,
                             prompt_chunk_tokens=512, batch_invariant=False),
        "embed": ModelSpec(kind="embedding", source=BUNDLED_MINILM, dimensions=384,
                           max_batch=32),
    }


class ScheduleSpec(BaseModel):
    """A recurring run fired by Celery beat: every `every_s` seconds or on a `cron` line."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    action: Literal["summarize_dir", "summarize_list", "housekeeping"] = Field(
        description="summarize_dir: new files of `path`; summarize_list: items popped from "
        "the Redis list `list_key`; housekeeping: sweep stale batches and dangling indexes"
    )
    every_s: float | None = Field(None, gt=0, description="interval in seconds")
    cron: str | None = Field(None, description="'minute hour day-of-month month day-of-week'")
    path: str | None = Field(None, description="summarize_dir: the directory")
    pattern: str = Field("*", description="summarize_dir: a glob of file names")
    list_key: str | None = Field(None, description="summarize_list: the Redis list to drain")
    max_items: int = Field(1000, ge=1, description="most items one run takes")
    model: str | None = Field(None, description="default: summary")
    instructions: str | None = Field(None, max_length=2000)
    max_tokens: int | None = Field(None, ge=1)
    priority: int = Field(2, ge=0, le=9)
    lock_ttl_s: float = Field(300, gt=0, description="longest a single tick may take")

    @model_validator(mode="after")
    def _complete(self) -> ScheduleSpec:
        if (self.every_s is None) == (self.cron is None):
            raise ValueError("give exactly one of every_s or cron")
        if self.cron is not None and len(self.cron.split()) != 5:
            raise ValueError("cron has five fields: minute hour day-of-month month day-of-week")
        if self.action == "summarize_dir" and not self.path:
            raise ValueError("summarize_dir needs path")
        if self.action == "summarize_list" and not self.list_key:
            raise ValueError("summarize_list needs list_key")
        return self


WebhookEvent = Literal["job.succeeded", "job.failed", "job.cancelled", "response.completed",
                       "response.incomplete", "response.failed", "response.cancelled",
                       "batch.completed", "batch.cancelled"]
WEBHOOK_EVENTS: tuple[WebhookEvent, ...] = typing.get_args(WebhookEvent)


class WebhookEndpoint(BaseModel):
    """A receiver told of the events it names, for every job, response and batch (beside the
    `webhook` a job or batch may name itself)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field(min_length=8, max_length=2048, description="http(s) URL to POST to")
    events: list[WebhookEvent] = Field(
        default_factory=lambda: list(WEBHOOK_EVENTS), description="which events it wants")


class SentinelSpec(BaseModel):
    """A Redis whose master Redis Sentinel names: every component asks the Sentinels for the
    current master (redis-py's Sentinel, kombu's Sentinel transport) and follows a failover."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    hosts: list[str] = Field(min_length=1, description="the Sentinels, as host:port")
    master: str = Field("tokenpool", min_length=1, description="the master's name in Sentinel")
    db: int = Field(0, ge=0, description="the Redis database number")
    username: str | None = Field(None, description="the master's ACL user (unset: default)")
    password: str | None = Field(None, description="the master's (and replicas') password")
    sentinel_password: str | None = Field(None, description="the Sentinels' own password")
    tls: bool = Field(False, description="TLS to the Sentinels and the master (the CA and "
                      "client certificate: redis_tls_*)")

    @model_validator(mode="after")
    def _ports(self) -> SentinelSpec:
        for host in self.hosts:
            name, _, port = host.rpartition(":")
            if not name or not port.isdigit():
                raise ValueError(f"hosts: {host!r} is not host:port")
        return self

    def url(self) -> str:
        """The address broker.connection reads (the hosts were checked by _ports)."""
        from broker.connection import SentinelAddress, parse_host_port

        return SentinelAddress([parse_host_port(h) for h in self.hosts], self.master, self.db,
                               self.username, self.password, self.sentinel_password,
                               {"ssl": True} if self.tls else {}).url()


class Settings(BaseSettings):
    """Everything configurable, with its unit in its name."""

    model_config = SettingsConfigDict(
        env_prefix="TOKENPOOL_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("TOKENPOOL_REDIS_URL", "REDIS_URL", "redis_url"),
        description="Redis to use; unset: `tokenpool up` starts an embedded redis-server",
    )
    redis_sentinel: SentinelSpec | None = Field(
        None, description="a Sentinel-managed Redis instead of redis_url "
        "(TOKENPOOL_REDIS_SENTINEL__HOSTS='[\"10.0.0.1:26379\", …]', …__MASTER, …__PASSWORD)"
    )
    redis_tls_ca_file: Path | None = Field(
        None, description="the CA that signs Redis's (and the Sentinels') certificate, for a "
        "rediss:// URL or redis_sentinel.tls (unset: the system's CAs)")
    redis_tls_cert_file: Path | None = Field(
        None, description="this client's certificate, when Redis asks for one "
        "(tls-auth-clients yes, Redis's default); with redis_tls_key_file")
    redis_tls_key_file: Path | None = Field(None, description="that certificate's key")
    key_prefix: str = Field("tokenpool", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    data_dir: Path = Field(Path("data"), description="embedded Redis data (AOF) and logs")
    cache_dir: Path = Field(
        Path.home() / ".cache" / "tokenpool", description="assembled bundled models"
    )
    api_host: str = Field("127.0.0.1", description="API bind address")
    api_port: int = Field(8000, ge=0, le=65535)
    behind_trusted_proxy: bool = Field(
        False, description="allow a non-loopback API bind with no API keys (a proxy in front "
        "authenticates); without keys the API otherwise refuses to bind beyond loopback"
    )
    key_requests_per_minute: int | None = Field(
        None, ge=1, description="default per-key requests per minute (unset: no limit)")
    key_max_active_jobs: int | None = Field(
        None, ge=1, description="default per-key queued plus running jobs (unset: no limit)")
    key_max_queued_jobs: int | None = Field(
        None, ge=1, description="default per-key jobs waiting to start (unset: no limit)")
    key_tokens_per_day: int | None = Field(
        None, ge=1, description="default per-key generated tokens per UTC day (unset: none)")
    webhook_secret: str | None = Field(
        None, pattern=r"^whsec_[A-Za-z0-9+/=]{16,}$", description="signs every webhook "
        "(Standard Webhooks: whsec_ and base64); unset: no webhooks")
    webhook_endpoints: list[WebhookEndpoint] = Field(
        default_factory=list, description="receivers told of the events they name")
    webhook_allow_networks: list[str] = Field(
        default_factory=list, description="private, loopback or link-local networks (CIDR) "
        "webhooks may still go to; by default none")
    webhook_allow_hosts: list[str] = Field(
        default_factory=list, description="host names webhooks may go to whatever they "
        "resolve to")
    webhook_timeout_s: float = Field(10.0, gt=0, le=60, description="one delivery's limit")
    webhook_max_attempts: int = Field(
        10, ge=1, le=30, description="tries before a delivery is dead-lettered")
    webhook_backoff_s: float = Field(
        2.0, gt=0, description="wait after the first failed try, doubling after each "
        "(10 tries: about 17 minutes in all)")
    webhook_max_response_bytes: int = Field(
        65_536, ge=0, description="most of a receiver's answer that is read")
    webhook_concurrency: int = Field(8, ge=1, le=256,
                                     description="deliveries at once per webhooks process")
    max_stop_chars: int = Field(200, ge=1, description="longest stop string")
    max_messages: int = Field(256, ge=1, description="most chat messages in one job")
    flower_port: int = Field(5555, ge=0, le=65535)
    flower_user: str = Field("admin")
    flower_password: str | None = Field(None, description="unset: generated and printed by up")
    embedded_redis_port: int = Field(6379, ge=0, le=65535, description="tried first by up")
    embedded_redis_appendfsync: Literal["everysec", "always"] = Field(
        "everysec", description="the embedded Redis's AOF fsync: everysec (a host crash can "
        "lose the last second of writes) or always (nothing acknowledged is lost; every write "
        "waits for the disk)"
    )
    max_body_bytes: int = Field(1_048_576, ge=1024, description="largest accepted request body")
    max_batch_jobs: int = Field(1000, ge=1, description="most jobs in one POST /v1/jobs/batch")
    max_file_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="largest file POST /v1/files takes (OpenAI's "
        "Batch API input; files live in Redis)")
    files_ttl_s: int = Field(30 * 86_400, ge=60,
                             description="life of an uploaded or output file in Redis")
    job_ttl_s: int = Field(86_400, ge=1, description="job record and stream life after it ends")
    live_ttl_s: int = Field(7 * 86_400, ge=60, description="life of a job not yet ended")
    responses_ttl_s: int = Field(
        30 * 86_400, ge=60, description="life of a stored /v1/responses response (its job, "
        "stream and conversation) after it ends; OpenAI keeps them 30 days"
    )
    stream_maxlen: int = Field(100_000, ge=100, description="events kept per job stream")
    idempotency_ttl_s: int = Field(86_400, ge=1, description="how long an Idempotency-Key holds")
    visibility_timeout_s: int = Field(
        120, ge=10, description="Celery redelivers a message its worker took but never acked "
        "after this long (a worker killed before starting it); a redelivered message of a job "
        "that started meanwhile is refused by the start script, so short is safe"
    )
    fair_share: bool = Field(
        True, description="queued jobs reach a model's Celery queue only as its workers' "
        "slots free up, the next slot going to the API key (or the keyless) with the least "
        "served against its weight, inside the highest priority waiting (docs/fair-share.md); "
        "false: every job goes to Celery at once, first come first served inside a priority"
    )
    heartbeat_interval_s: float = Field(2.0, gt=0, description="worker heartbeat period")
    heartbeat_ttl_s: float = Field(10.0, gt=0, description="a worker is gone after this silence")
    worker_gone_retention_s: float = Field(
        600.0, gt=0, description="how long /v1/workers lists a gone or stopped worker"
    )
    worker_memory_limit_mb: float | None = Field(
        None, gt=0, description="most memory (MB) a worker's model may take, checked before a "
        "swap loads one; unset: the free VRAM (GPU) or RAM (CPU) plus what the old model frees"
    )
    max_batch_items: int = Field(100_000, ge=1, description="most items in one batch")
    max_batch_body_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="largest POST /v1/batches body (JSON or JSONL)"
    )
    batch_ttl_s: int = Field(
        7 * 86_400, ge=60, description="how long housekeeping keeps a finished batch's state"
    )
    swap_drain_timeout_s: float = Field(
        600.0, gt=0, description="how long a swap waits for the jobs in flight to finish"
    )
    sse_keepalive_s: float = Field(15.0, gt=0, description="SSE comment sent when idle")
    max_sse_followers: int = Field(
        1000, ge=1, description="SSE followers one API process serves at once"
    )
    max_attempts: int = Field(
        3, ge=1, le=100, description="a job whose worker dies this often ends failed (poison)"
    )
    job_timeout_s: float = Field(600.0, gt=0, description="run-time limit of a job by default")
    max_job_timeout_s: float = Field(3600.0, gt=0, description="largest timeout_s a job may ask")
    timeout_grace_s: float = Field(
        10.0, ge=0, description="after this past its deadline a stuck job is failed by the reaper"
    )
    dead_letter_ttl_s: int = Field(
        7 * 86_400, ge=60, description="how long a dead-lettered job stays inspectable"
    )
    redis_confirm_replicas: int = Field(
        0, ge=0, le=16, description="a submit answers 202 only once this many replicas have "
        "the job and its message (Redis WAIT); with Sentinel, 1 keeps an accepted job through a "
        "failover (0: the primary's word, as on one Redis)"
    )
    redis_confirm_timeout_ms: int = Field(
        1000, ge=1, description="how long a submit waits for those replicas before a 503"
    )
    worker_redis_retry_s: float = Field(
        60.0, ge=0, description="a worker retries Redis this long before giving up a write"
    )
    summary_chunk_overlap_tokens: int = Field(32, ge=0, description="map-reduce chunk overlap")
    models: dict[str, ModelSpec] = Field(default_factory=default_models)
    schedules: dict[str, ScheduleSpec] = Field(
        default_factory=dict, description="recurring runs for Celery beat (none by default)"
    )

    @model_validator(mode="before")
    @classmethod
    def _merge_models(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "models" not in data:
            return data
        merged: dict[str, Any] = {k: v.model_dump() for k, v in default_models().items()}
        for name, spec in (data["models"] or {}).items():
            given = spec.model_dump() if isinstance(spec, ModelSpec) else dict(spec)
            merged[name] = {**merged.get(name, {}), **given}
        return {**data, "models": {k: v for k, v in merged.items() if _enabled(v)}}

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config_file = os.environ.get("TOKENPOOL_CONFIG")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)))
        return tuple(sources)

    @model_validator(mode="after")
    def _timeouts_agree(self) -> Settings:
        if self.job_timeout_s > self.max_job_timeout_s:
            raise ValueError("job_timeout_s must not exceed max_job_timeout_s")
        return self

    @model_validator(mode="after")
    def _tls_files(self) -> Settings:
        if (self.redis_tls_cert_file is None) != (self.redis_tls_key_file is None):
            raise ValueError("redis_tls_cert_file and redis_tls_key_file go together")
        for name in ("redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: no such file: {path}")
        try:
            self.redis_address  # noqa: B018 (with_tls checks that the address can take them)
        except ValueError as exc:
            raise ValueError(f"redis_tls_ca_file/cert/key: {exc}") from None
        return self

    def model(self, name: str) -> ModelSpec:
        return self.models[name]

    @property
    def redis_address(self) -> str | None:
        """The one address every component reaches Redis by (broker.connection makes the
        clients): the Sentinel group's if set, else redis_url."""
        from broker.connection import TLS_FILES, with_tls

        address = self.redis_sentinel.url() if self.redis_sentinel else self.redis_url
        if address is None:
            return None
        files = (self.redis_tls_ca_file, self.redis_tls_cert_file, self.redis_tls_key_file)
        return with_tls(address, {key: str(path) for key, path in zip(TLS_FILES, files,
                                                                       strict=True) if path})
