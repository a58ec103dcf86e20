"""Settings of loraplex, read from ``LORAPLEX_*`` environment variables and ``loraplex.toml``.

Every field here is a ``loraplex serve`` flag (the flags are generated from the fields) and a
``LORAPLEX_<FIELD>`` variable. Paths default to places under ``LORAPLEX_HOME``
(``~/.loraplex``). This module only describes settings; it does not create folders or start
anything. ``load_settings`` turns a bad value into a one-line ``SettingsError``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from loraplex.errors import InvalidRequest


def default_home() -> Path:
    """The folder everything lives under unless configured elsewhere."""
    import os

    return Path(os.environ.get("LORAPLEX_HOME", "~/.loraplex")).expanduser()


class Settings(BaseSettings):
    """All loraplex settings. Environment: ``LORAPLEX_<FIELD>`` (upper case)."""

    model_config = SettingsConfigDict(
        env_prefix="LORAPLEX_", toml_file="loraplex.toml", extra="ignore"
    )

    home: Path = Field(default_factory=default_home, description="Root of cache, registry, usage.")

    # --- base model ---
    base_model: Path | None = Field(
        None, description="HF-format base model folder; default: the prepared bundled model."
    )
    served_model_name: str = Field(
        "smollm2-135m", description="Name clients use in `model` to get the base model."
    )

    # --- server ---
    host: str = Field("127.0.0.1", description="Address the HTTP server binds.")
    port: int = Field(
        8000, ge=0, le=65535, description="Port the HTTP server binds; 0 picks a free one."
    )
    auth: Literal["on", "off"] = Field(
        "on", description="Require tenant API keys (Authorization: Bearer KEY)."
    )
    allow_insecure_no_auth: bool = Field(
        False,
        description="Allow auth off on a non-loopback address: anyone who reaches the port "
        "may use every adapter.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Level of the server's loraplex logs (debug: per-load timings)."
    )
    admin_key: str | None = Field(None, description="Key for /admin routes (Bearer).")
    metrics_key: str | None = Field(
        None, description="Key that may read /metrics when auth is on (the admin key may too)."
    )
    key_cache_seconds: float = Field(
        2.0, ge=0, description="How long a key lookup is trusted; a revoked key stops this fast."
    )
    adapters_dir: Path | None = Field(
        None, description="Serve PEFT adapters from this plain folder instead of the registry."
    )
    max_request_bytes: int = Field(1_000_000, ge=1, description="Largest request body, bytes.")
    # --- bad input (issue 11): the request head's size is capped in the parser and the app
    max_header_bytes: int = Field(
        32_768, ge=1024, description="Largest request target + headers, bytes (413 past it)."
    )

    # --- per-request caps and fair admission ---
    max_tokens_limit: int = Field(2048, ge=1, description="Largest max_tokens a request may ask.")
    max_prompt_tokens: int = Field(2048, ge=1, description="Longest prompt in tokens.")
    max_prompts: int = Field(16, ge=1, description="Most prompts in one completions request.")
    max_n: int = Field(8, ge=1, description="Largest n (choices per prompt).")
    max_engine_sequences: int | None = Field(
        None,
        ge=1,
        description="Sequences handed to the engine at once; the rest wait in per-tenant "
        "queues served by weight. Default: max_num_seqs.",
    )
    reserved_sequences: int | None = Field(
        None,
        ge=0,
        description="Engine sequences kept for tenants with nothing in flight, so a light "
        "tenant starts at once beside a flood. Default: an eighth of max_engine_sequences.",
    )
    shared_sequences: int | None = Field(
        None,
        ge=0,
        description="Engine sequences divided by weight among the active tenants; tenants "
        "that want more hold their shares together plus what lend_sequences lets them "
        "borrow of the light tenants' unused part. Default: max_engine_sequences "
        "minus reserved_sequences; 0 turns shares off.",
    )
    lend_sequences: int | None = Field(
        None,
        ge=0,
        description="Engine sequences of the light tenants' unused shares that tenants "
        "wanting more may borrow together; a lender's requests take them back first, as the "
        "borrowers' requests end (none is aborted). Default: a quarter of "
        "max_engine_sequences (on CPU each sequence in the batch slows every step, so more "
        "adds latency for the lender and little throughput; raise it on a GPU); 0: the "
        "unused shares stay free.",
    )
    seat_grace_seconds: float = Field(
        0.25,
        ge=0,
        description="With lending, a seat a tenant gives back within its share stays its own "
        "this long while others wait, so its next request takes it back before a borrower "
        "does; 0 turns this off.",
    )
    tenant_idle_seconds: float = Field(
        5.0,
        ge=0,
        description="A tenant keeps its share of the engine this long after its last request.",
    )
    adapter_wait_seconds: float = Field(
        0.0,
        ge=0,
        description="Grouping by adapter: longest a request of an adapter not in the engine is "
        "held back while requests of the max_loras adapters in it go first; 0 (default) turns "
        "it off. vLLM's scheduler already keeps such a request waiting without holding up the "
        "others, so holding it back helps only when engine sequences are the bottleneck "
        "(bench/README.md, adapter-aware admission).",
    )
    tenant_queue_size: int = Field(
        64, ge=1, description="Requests one tenant may have waiting; more get 429."
    )
    queue_timeout_seconds: float = Field(
        60.0, gt=0, description="Longest wait in the queue before a 429 with Retry-After."
    )
    usage_flush_seconds: float = Field(
        2.0, gt=0, description="How often usage counters are written to the registry database."
    )

    # --- registry ---
    registry_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the adapter catalog; default sqlite under HOME/registry. "
        "Use postgresql://user:pw@host/db to share it between machines.",
    )
    blob_url: str | None = Field(
        None,
        description="Where adapter files are stored: a folder (default HOME/registry/blobs) "
        "or s3://bucket/prefix.",
    )
    s3_endpoint_url: str | None = Field(
        None, description="Endpoint of an S3-compatible store (MinIO...); unset means AWS S3."
    )
    blob_cache_gib: float = Field(
        4.0, description="Size bound of the local cache of fetched adapters (LRU), in GiB."
    )
    max_adapter_mb: int = Field(1024, description="Largest adapter (all its files) accepted, MiB.")

    # --- registry and storage faults: bounded waits, last-known-good aliases ---
    registry_timeout_seconds: float = Field(
        5.0,
        gt=0,
        description="Longest wait for the registry database: connect, statement, a pooled "
        "connection, and one lookup as a whole; past it the request gets 503.",
    )
    registry_retry_seconds: float = Field(
        1.0, gt=0, description="How often a server asks a registry it found down again."
    )
    registry_stale_seconds: float = Field(
        300.0,
        ge=0,
        description="While the registry is down, an alias or version resolved this long ago "
        "or less is still served from memory; older ones get 503.",
    )
    blob_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="S3 connect and read timeout (a stalled connection fails after this).",
    )
    blob_fetch_timeout_seconds: float = Field(
        120.0, gt=0, description="Longest download of one adapter file from the blob store."
    )

    # --- engine ---
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="Engine dtype; auto = float32 on CPU (greedy tokens batched == solo), "
        "bfloat16 on CUDA.",
    )
    max_loras: int = Field(8, ge=1, description="Adapters active in one batch (engine slots).")
    max_cpu_loras: int = Field(
        32, ge=1, description="Adapters kept loaded in the CPU LRU cache (>= max_loras)."
    )
    max_lora_rank: int = Field(64, ge=1, description="Largest adapter rank the engine accepts.")
    max_model_len: int = Field(2048, ge=16, description="Longest prompt + completion in tokens.")
    max_num_seqs: int = Field(64, ge=1, description="Most sequences the engine runs at once.")
    kv_cache_gib: int = Field(2, ge=1, description="KV cache GiB on CPU (VLLM_CPU_KVCACHE_SPACE).")
    gpu_memory_utilization: float = Field(
        0.85, gt=0, le=1, description="Share of GPU memory vLLM may use."
    )
    fast_lora: Literal["on", "off"] = Field("on", description="Use loraplex's CPU LoRA ops.")
    merge_hot: Literal["on", "off"] = Field(
        "off",
        description="Merge an adapter that carries most of the traffic into the base weights "
        "and serve it at base speed (CPU, float32, fast_lora on; keeps a second copy of the "
        "linear weights). Other requests then pay for two LoRAs until it is unmerged.",
    )
    merge_hot_share: float = Field(
        0.9,
        gt=0.6,
        le=1,
        description="Share of recent tokens at which an adapter is merged (merge_hot); it is "
        "unmerged when its share falls below 0.6.",
    )
    merge_hot_tokens: int = Field(
        1024,
        ge=1,
        description="Tokens over which merge_hot averages each adapter's share; a merge takes "
        "about 2.3 times this many tokens of one adapter alone.",
    )
    enforce_eager: bool = Field(
        False,
        description="Run the model eagerly, without torch.compile: starts about a minute "
        "sooner on CPU, decodes slower.",
    )
    cpu_worker: Literal["auto", "inline", "process"] = Field(
        "auto",
        description="Where vLLM runs the model on CPU. inline: in vLLM's engine-core process, "
        "on the threads OMP_NUM_THREADS allows (one process less to start, no core kept for "
        "the scheduler). process: vLLM's CPU default, a worker process of its own bound to "
        "every core but one (VLLM_CPU_OMP_THREADS_BIND). auto: process when "
        "VLLM_CPU_OMP_THREADS_BIND is set (Ray Serve replicas bind cores), else inline.",
    )
    seed: int = Field(0, description="Engine seed for sampling when a request gives none.")

    # --- OpenAI compatibility (issue 13): logprobs ---
    max_logprobs: int = Field(
        20,
        ge=0,
        le=20,
        description="Most alternatives per token a request may ask (chat top_logprobs, "
        "completions logprobs); OpenAI's own bound is 20.",
    )

    # --- adapter residency and memory budget (engine hardening) ---
    adapter_cache_mb: int = Field(
        1024,
        ge=1,
        description="Bytes of adapter weights the engine keeps loaded (CPU cache), MiB; the "
        "least recently used unpinned adapters are unloaded to stay under it.",
    )
    max_pinned_adapters: int | None = Field(
        None,
        ge=0,
        description="Most adapters pinned at once (< max_loras: a pin holds an engine slot). "
        "Default: half of max_loras.",
    )
    failed_load_seconds: float = Field(
        300.0,
        ge=0,
        description="How long an adapter version that failed to load is refused without "
        "asking the engine again.",
    )
    memory_budget_gib: float | None = Field(
        None,
        gt=0,
        description="Host memory the server may plan to use (weights, KV cache, LoRA slots, "
        "adapter cache); the server refuses to start above it. Default: physical memory.",
    )

    # --- process lifecycle: liveness, drain, deadlines ---
    stall_seconds: float = Field(
        10.0,
        gt=0,
        description="/health answers 503 when requests wait and the engine has produced no "
        "token for this many seconds (a stopped or wedged engine).",
    )
    shutdown_timeout: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM or Ctrl-C, seconds requests in progress may take to finish "
        "before they are stopped; new requests get 503 meanwhile.",
    )
    request_timeout_seconds: float = Field(
        600.0,
        gt=0,
        description="Deadline of every request (adapter load and generation); past it the "
        "request is stopped with 504.",
    )

    # --- rollout (issue 12): how fast servers follow the registry, preload, gc ---
    alias_refresh_seconds: float = Field(
        0.2,
        ge=0,
        description="A server checks the registry's generation counter this often and trusts "
        "names it resolved while its last check is under twice this old, so a promote or "
        "rollback is served within 2x this (0: look every alias up on every request).",
    )
    heartbeat_seconds: float = Field(
        1.0,
        gt=0,
        description="How often a registry-backed server records that it is alive (for "
        "`promote --preload`, which waits for the live servers to warm the new version).",
    )
    gc_grace_seconds: float = Field(
        3600.0,
        ge=0,
        description="`adapters gc` keeps unreferenced blobs younger than this: a push stores "
        "blobs before it records the version.",
    )

    # --- audit ---
    user: str | None = Field(
        None, description="Who is acting, recorded in the registry's history; default: OS user."
    )

    # --- observability (issue 14): metrics labels, request log, tracing, console ---
    metrics_max_adapters: int = Field(
        100, ge=1, description="Adapter versions with their own metric label; later ones: other."
    )
    metrics_max_tenants: int = Field(
        100, ge=1, description="Tenants with their own metric label; later ones: other."
    )
    metrics_hit_window_seconds: float = Field(
        60.0, gt=0, description="Window of loraplex_adapter_cache_hit_ratio, in seconds."
    )
    log_prompts: bool = Field(
        False, description="Put the prompt text in each request's JSON log line (off: never)."
    )
    otlp_endpoint: str | None = Field(
        None,
        description="OTLP/HTTP traces endpoint (e.g. http://collector:4318/v1/traces); one "
        "span per request. Off when unset; needs the otel extra.",
    )

    @model_validator(mode="after")
    def _cpu_cache_holds_the_batch(self) -> Settings:
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras}): "
                "every adapter in a batch is also in the CPU cache"
            )
        return self

    @model_validator(mode="after")
    def _pins_leave_engine_slots(self) -> Settings:
        if self.max_pinned_adapters is not None and self.max_pinned_adapters >= self.max_loras:
            raise ValueError(
                f"max_pinned_adapters ({self.max_pinned_adapters}) must be < max_loras "
                f"({self.max_loras}): a pinned adapter keeps an engine slot, and other adapters "
                "need at least one"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags beat environment, environment beats loraplex.toml."""
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    @property
    def models_dir(self) -> Path:
        """Where prepared base models are cached."""
        return self.home / "models"

    @property
    def pin_limit(self) -> int:
        """The pin bound in effect."""
        if self.max_pinned_adapters is None:
            return self.max_loras // 2
        return self.max_pinned_adapters

    @property
    def resolved_adapters_dir(self) -> Path:
        """The adapters folder in effect."""
        return self.adapters_dir or self.home / "adapters"


class SettingsError(InvalidRequest):
    """A setting has a value loraplex cannot use (flag, environment or loraplex.toml)."""

    code = "invalid_setting"


def load_settings(**overrides: object) -> Settings:
    """Settings from ``overrides`` (flags), the environment and loraplex.toml.

    Raises ``SettingsError`` naming the setting, its flag and variable, and what is wrong.
    """
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else ""
            where = (
                f"--{field.replace('_', '-')} / LORAPLEX_{field.upper()}={error['input']}: "
                if field
                else ""
            )
            problems.append(f"{where}{error['msg'].removeprefix('Value error, ')}")
        raise SettingsError("invalid setting " + "; ".join(problems)) from None
