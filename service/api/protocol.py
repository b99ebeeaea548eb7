"""Request and response models of the HTTP API; the OpenAPI document is generated from these."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Role = Literal["system", "user", "assistant"]
MAX_STOP_SEQUENCES = 4


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatMessage(_Strict):
    role: Role
    content: str = Field(min_length=1, max_length=200_000)


class SamplingFields(BaseModel):
    """Generation settings shared by /completion and the OpenAI-compatible endpoint."""

    max_tokens: int | None = Field(
        None, ge=1, description="Most tokens to generate (server default if unset)."
    )
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOP_SEQUENCES} stop strings.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = Field(False, description="Answer with Server-Sent Events.")

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return v

    def stop_tuple(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(SamplingFields, _Strict):
    messages: list[ChatMessage] = Field(min_length=1)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


FinishReasonName = Literal["stop", "length", "cancelled", "timeout", "error"]


class CompletionResponse(BaseModel):
    id: str
    model: str
    message: AssistantMessage
    finish_reason: FinishReasonName
    usage: Usage


class ErrorDetail(BaseModel):
    type: str
    message: str
    details: list[dict[str, Any]] | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class CompletionChunk(BaseModel):
    """One SSE event of a streamed /completion; the last has ``finish_reason`` and ``usage``."""

    id: str
    model: str
    delta: str
    finish_reason: FinishReasonName | None = None
    usage: Usage | None = None
    error: ErrorDetail | None = None  # only on a last event whose generation failed


class DeployRequest(_Strict):
    model_id: str = Field(
        min_length=1, max_length=512, description="Hub id (org/name), local path or bundled alias."
    )
    revision: str | None = Field(None, min_length=1, max_length=256)


class ModelInfoResponse(BaseModel):
    model_id: str
    revision: str | None
    source: Literal["hub", "local", "bundled"]
    dtype: str
    device: str
    parameters: int
    context_length: int | None
    loaded_at: str


class Progress(BaseModel):
    bytes_done: int
    bytes_total: int | None
    fraction: float | None


class DeploymentResponse(BaseModel):
    id: str
    model_id: str
    revision: str | None
    trigger: Literal["startup", "restore", "api", "fleet"]
    phase: Literal["pending", "resolving", "downloading", "loading", "warming", "ready", "failed"]
    error: str | None
    progress: Progress | None
    created_at: str
    finished_at: str | None
    duration_s: float
    phase_seconds: dict[str, float]


class FleetModel(BaseModel):
    model_id: str
    revision: str | None


class FleetDesired(FleetModel):
    rollout_id: str | None
    previous: FleetModel | None


class FleetRollout(BaseModel):
    id: str | None
    phase: Literal["rolling_out", "ready", "rolled_back"]
    ready: int = Field(description="Replicas serving the desired model.")
    total: int
    message: str = Field(description="e.g. 'rolling out 2/3'.")
    failed_replica: str | None
    reason: str | None


class FleetReplica(BaseModel):
    name: str = Field(description="The replica's Pod name.")
    model_id: str | None
    revision: str | None
    phase: str
    error: str | None
    rollout_id: str | None
    updated_at: str | None


class FleetView(BaseModel):
    """Cluster mode: the desired model (from the Kubernetes API) and every replica's state."""

    desired: FleetDesired | None
    rollout: FleetRollout | None
    replicas: list[FleetReplica]
    connection: Literal["connected", "disconnected"]


class StatusResponse(BaseModel):
    ready: bool
    serving: ModelInfoResponse | None
    deployment: DeploymentResponse | None
    history: list[DeploymentResponse]
    fleet: FleetView | None = Field(None, description="Cluster mode only (absent otherwise).")


class HealthResponse(BaseModel):
    status: Literal["ok", "ready"]


# --- OpenAI-compatible models (the subset the official SDK sends and reads) ---


class OpenAIChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send name/tool fields we do not use
    role: Role
    content: str = Field(min_length=1, max_length=200_000)


class OpenAIChatRequest(SamplingFields):
    model_config = ConfigDict(extra="ignore")  # unknown OpenAI options are accepted and ignored, like vLLM
    model: str | None = None
    messages: list[OpenAIChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=1, description="Only one choice is generated.")
    stream_options: dict[str, Any] | None = None


class OpenAIChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str


class OpenAIChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[OpenAIChoice]
    usage: Usage


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "model-serving"


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]
