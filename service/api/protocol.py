"""Request and response models of the HTTP API; the OpenAPI document is generated from these."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Role = Literal["system", "user", "assistant", "developer"]
MAX_STOP_SEQUENCES = 4
MAX_CONTENT_CHARS = 200_000
MAX_LOGIT_BIAS = 300
MAX_TOP_LOGPROBS = 20


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ContentPart(BaseModel):
    """One part of a message's content, as the SDKs' typed messages send it. Text parts are served
    (joined with newlines, as vLLM does); any other type (``image_url``, ``input_audio``, ``file``,
    ...) is refused with 400 naming it."""

    model_config = ConfigDict(extra="allow")  # a non-text part's payload is never read
    type: str = Field(min_length=1, max_length=64)
    text: str | None = Field(None, max_length=MAX_CONTENT_CHARS)

    @model_validator(mode="after")
    def _text_part_has_text(self) -> ContentPart:
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs 'text'")
        return self


Content = (
    Annotated[str, Field(max_length=MAX_CONTENT_CHARS)]
    | Annotated[list[ContentPart], Field(min_length=1, max_length=256)]
)


class ChatMessage(_Strict):
    """One chat message. ``developer`` is rendered as ``system``; ``name`` goes to the chat template."""

    role: Role
    content: Content = Field(description="A string (may be empty) or a list of text parts.")
    name: str | None = Field(None, min_length=1, max_length=256)

    @model_validator(mode="after")
    def _joined_text_is_bounded(self) -> ChatMessage:
        if len(self.text()) > MAX_CONTENT_CHARS:
            raise ValueError(f"content longer than {MAX_CONTENT_CHARS} characters")
        return self

    def text(self) -> str:
        """The content as one string: the text parts joined with newlines."""
        if isinstance(self.content, list):
            return "\n".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""

    def non_text_part_types(self) -> list[str]:
        return [p.type for p in self.content if p.type != "text"] if isinstance(self.content, list) else []

    def template_message(self) -> dict[str, str]:
        """The message as the model's chat template reads it."""
        message = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.name is not None:
            message["name"] = self.name
        return message


class SamplingFields(BaseModel):
    """Generation settings shared by /completion and the OpenAI-compatible endpoint."""

    max_tokens: int | None = Field(
        None, ge=1, description="Most tokens to generate (server default if unset)."
    )
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy decoding.")
    top_p: float = Field(1.0, ge=0.0, le=1.0, description="Nucleus sampling mass; 0 is greedy decoding.")
    stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOP_SEQUENCES} stop strings.")
    seed: int | None = Field(
        None, ge=-(2**63), le=2**63 - 1, description="Reproducible sampling; a negative seed is a random one."
    )
    stream: bool = Field(False, description="Answer with Server-Sent Events.")
    presence_penalty: float = Field(
        0.0, ge=-2, le=2, description="Subtracted once from the score of each token already generated."
    )
    frequency_penalty: float = Field(
        0.0, ge=-2, le=2, description="Subtracted from a token's score once per time it was generated."
    )
    repetition_penalty: float = Field(
        1.0,
        ge=0.01,  # a smaller one overflows the scores it divides
        le=10,
        description="vLLM's: divides the positive (multiplies the negative) score of every token of the "
        "prompt and output; 1 is none.",
    )
    logit_bias: dict[str, float] | None = Field(
        None,
        max_length=MAX_LOGIT_BIAS,
        description="Token id (as a string) to a bias in [-100, 100] added to its score before sampling.",
    )

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (v or {}).items():
            if not token.isdigit():
                raise ValueError(f"logit_bias keys are token ids, got {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values lie in [-100, 100], got {bias}")
        return v

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

    @property
    def greedy(self) -> bool:
        """Temperature 0, or top_p 0 (clients send it to mean "deterministic")."""
        return self.temperature == 0 or self.top_p == 0

    @property
    def sampling_seed(self) -> int | None:
        """The seed to sample with; None (a random one) for none or a negative one (llama.cpp's -1)."""
        return None if self.seed is None or self.seed < 0 else self.seed


class ChatLogprobsFields(BaseModel):
    """Logprobs as the chat API asks for them."""

    logprobs: bool = Field(
        False, description="Return each generated token's logprob (raw model distribution, natural log)."
    )
    top_logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="With logprobs: also the most likely tokens at each position, this many.",
    )

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatLogprobsFields:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def logprobs_k(self) -> int | None:
        """How many alternatives per token the engine computes; None for no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingFields, ChatLogprobsFields, _Strict):
    messages: list[ChatMessage] = Field(min_length=1)


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens taken from the prefix cache instead of computed.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


FinishReasonName = Literal["stop", "length", "cancelled", "timeout", "error"]


class TopLogprob(BaseModel):
    """A token and its logprob (natural log, raw model distribution); ``bytes`` its UTF-8 bytes."""

    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    """A generated token's logprob and the ``top_logprobs`` most likely tokens at its position."""

    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    """OpenAI's ``choices[].logprobs`` of the chat API."""

    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class CompletionResponse(BaseModel):
    id: str
    model: str
    message: AssistantMessage
    finish_reason: FinishReasonName
    usage: Usage
    logprobs: ChoiceLogprobs | None = None


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
    logprobs: ChoiceLogprobs | None = None  # the tokens of this event, when asked
    finish_reason: FinishReasonName | None = None
    usage: Usage | None = None
    error: ErrorDetail | None = None  # only on a last event whose generation failed


class DeployRequest(_Strict):
    model_id: str = Field(
        min_length=1, max_length=512, description="Hub id (org/name), local path or bundled alias."
    )
    revision: str | None = Field(None, min_length=1, max_length=256)


class FastPathInfo(BaseModel):
    kernel: Literal["gguf_blocks"] | None = Field(
        description="Kernel serving the linear layers; null: PyTorch's, as loaded."
    )
    layers: dict[str, int] = Field(
        description="Linear layers the kernel serves, by block format (Q4_1, Q8_0)."
    )
    reason: str | None = Field(
        description="Why the kernel serves none or only some of them, or why decoder layers do not run fused."
    )
    fused_layers: int = Field(
        description="Decoder layers that run as one kernel call each at decode (Llama models only)."
    )


class ModelInfoResponse(BaseModel):
    model_id: str
    revision: str | None
    source: Literal["hub", "local", "bundled"]
    dtype: str
    device: str
    parameters: int
    context_length: int | None
    loaded_at: str
    fast_path: FastPathInfo


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


class LoadSummary(BaseModel):
    """The load at a glance, from the server's own metrics (``GET /status/load``)."""

    running: int = Field(description="Sequences being generated now.")
    queued: int = Field(description="Requests waiting for a batch slot.")
    max_running: int = Field(description="Batch slots.")
    tokens_per_s: float = Field(description="Completion tokens per second over tokens_window_s.")
    tokens_window_s: float = Field(description="Seconds the rate covers (0 until a sample is old enough).")
    ttft_p95_s: float | None = Field(
        description="95th percentile time to first token in seconds over ttft_window_s, estimated from "
        "histogram buckets as Prometheus' histogram_quantile does; null without requests."
    )
    ttft_window_s: float = Field(description="Seconds the percentile covers (up to 300).")


class HealthResponse(BaseModel):
    status: Literal["ok", "ready"]


# --- OpenAI-compatible models (the subset the official SDK sends and reads) ---


ToolRole = Literal["tool", "function"]


class FunctionCall(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    arguments: str = Field(max_length=MAX_CONTENT_CHARS, description="JSON text of the arguments.")


class ToolCallItem(BaseModel):
    """A call the assistant made, as OpenAI returns it (and clients send it back in the history)."""

    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class OpenAIChatMessage(ChatMessage):
    """A chat message as OpenAI takes it: ``assistant`` messages may carry ``tool_calls``, ``tool``
    messages answer one by ``tool_call_id``; the legacy ``function`` role and ``function_call`` are
    refused with 400."""

    model_config = ConfigDict(extra="ignore")  # e.g. refusal, audio: not read
    role: Role | ToolRole
    content: Content | None = Field(None, description="A string or text parts; null only for assistant.")
    tool_calls: list[ToolCallItem] | None = Field(None, max_length=128)
    tool_call_id: str | None = Field(None, max_length=256)
    function_call: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _content_unless_assistant(self) -> OpenAIChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content is required for role {self.role!r}")
        return self

    def unhonoured(self) -> list[str]:
        """What in this message asks for the legacy function-calling API, which is not served."""
        refused = ["role 'function'"] if self.role == "function" else []
        return refused + (["function_call"] if self.function_call else [])

    def template_message(self) -> dict[str, Any]:
        """The message as chat templates read it: tool-call arguments as an object (Hermes-style
        templates write them with ``tojson``), the answered call's id on a tool message."""
        message: dict[str, Any] = dict(super().template_message())
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": c.type,
                    "function": {"name": c.function.name, "arguments": _json_or_text(c.function.arguments)},
                }
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: the output is constrained to validate against ``schema``."""

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(
        None, alias="schema", description="A JSON Schema; absent means any JSON object."
    )
    strict: bool | None = Field(None, description="Always strict here: the output is constrained.")


class ResponseFormat(BaseModel):
    """``{"type": "text"}``, ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema":
    {...}}``; the JSON forms are served by constrained decoding."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema', and only with it")
        return self


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = Field(None, max_length=MAX_CONTENT_CHARS)
    parameters: dict[str, Any] | None = Field(
        None, description="JSON Schema of the arguments; a forced call's arguments validate against it."
    )
    strict: bool | None = None


class ToolDefinition(BaseModel):
    """A tool the model may call; only ``function`` tools are served (others are refused with 400)."""

    model_config = ConfigDict(extra="allow")  # another type's payload is never read
    type: str = Field(min_length=1, max_length=64)
    function: FunctionDefinition | None = None

    @model_validator(mode="after")
    def _function_has_definition(self) -> ToolDefinition:
        if self.type == "function" and self.function is None:
            raise ValueError("a function tool needs 'function'")
        return self


class NamedFunction(BaseModel):
    name: str = Field(min_length=1, max_length=64)


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


#: Options that change the answer and are not served yet, each with the values that ask for
#: nothing (accepted): OpenAI's own, then the extensions of vLLM and llama.cpp that clients send
#: through ``extra_body``. Any other value is refused with 400 naming the option. Unknown fields
#: not listed here are accepted and ignored, like vLLM does.
UNHONOURED_OPTIONS: dict[str, tuple[Any, ...]] = {
    "response_format": (None, {"type": "text"}),
    "suffix": (None, ""),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "web_search_options": (None,),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "top_k": (None, 0, -1),
    "min_p": (None, 0),
    "min_tokens": (None, 0),
    "ignore_eos": (None, False),
    "use_beam_search": (None, False),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "structured_outputs": (None,),
    "grammar": (None, ""),
    "json_schema": (None,),
    "chat_template_kwargs": (None, {}),
}


class OpenAIRequest(SamplingFields):
    """What OpenAI's chat and legacy completions requests share. A null field means "not given"."""

    model_config = ConfigDict(extra="allow")  # unknown options are accepted and ignored, like vLLM
    model: str | None = None
    n: int = Field(
        1, ge=1, description="Choices to generate (up to SERVING_MAX_N); the prompt is prefilled once."
    )
    best_of: int | None = Field(None, ge=1, description="Only equal to n is served; else refused with 400.")
    stream_options: dict[str, Any] | None = Field(None, description="include_usage is honoured.")
    # Metadata that does not change the answer: accepted and ignored.
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_not_given(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    def unhonoured_options(self) -> list[str]:
        """Names of what this request asks for that is not served (the handler refuses it with 400)."""
        extra = self.model_extra or {}
        refused = [
            name
            for name, neutral in UNHONOURED_OPTIONS.items()
            if (name in self.model_fields_set or name in extra) and getattr(self, name) not in neutral
        ]
        if self.best_of not in (None, self.n):
            refused.append("best_of")
        return refused

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class OpenAIChatRequest(OpenAIRequest, ChatLogprobsFields):
    """``POST /v1/chat/completions``."""

    messages: list[OpenAIChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Alias of max_tokens (wins over it).")
    response_format: ResponseFormat | None = Field(None, description="JSON output by constrained decoding.")
    tools: list[ToolDefinition] | None = Field(
        None, max_length=128, description="Function tools, rendered by the model's chat template."
    )
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="required and a named function are enforced by constrained decoding."
    )
    parallel_tool_calls: bool | None = Field(
        None, description="false keeps the first call; a forced call is always exactly one."
    )
    functions: list[dict[str, Any]] | None = Field(
        None, description='Refused unless function_call is "none".'
    )
    function_call: str | dict[str, Any] | None = None

    @property
    def calls_tools(self) -> bool:
        """Tools are offered to the model (given, and tool_choice is not "none")."""
        return bool(self.tools) and self.tool_choice != "none"

    def unhonoured_options(self) -> list[str]:
        # response_format is served here (the legacy endpoint still refuses it).
        refused = [name for name in super().unhonoured_options() if name != "response_format"]
        if self.functions and self.function_call != "none":
            refused.append("functions")
        refused += [
            f"tools[{i}].type {t.type!r}" for i, t in enumerate(self.tools or []) if t.type != "function"
        ]
        names = [t.function.name for t in self.tools or [] if t.function is not None]
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            refused.append(f"tool_choice (no tool named {self.tool_choice.function.name!r})")
        elif self.tool_choice == "required" and not names:
            refused.append("tool_choice")
        if self.calls_tools and self.response_format is not None and self.response_format.type != "text":
            refused.append("response_format together with tools")
        for i, message in enumerate(self.messages):
            refused += [f"messages[{i}].{what}" for what in message.unhonoured()]
        return refused


MAX_PROMPTS = 64
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=1_000_000)]


class LegacyCompletionRequest(OpenAIRequest):
    """``POST /v1/completions`` (OpenAI's legacy completions): raw prompts, no chat template."""

    prompt: (
        Annotated[str, Field(max_length=MAX_CONTENT_CHARS)]
        | Annotated[
            list[Annotated[str, Field(max_length=MAX_CONTENT_CHARS)]],
            Field(min_length=1, max_length=MAX_PROMPTS),
        ]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    ) = Field(description="A string, a list of strings, a list of token ids or a list of such lists.")
    max_tokens: int | None = Field(
        16, ge=1, description="Most tokens to generate per choice (OpenAI's default 16)."
    )
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="Return each token's logprob and this many most likely alternatives per position.",
    )
    echo: bool = Field(False, description="Prepend the prompt (and, with logprobs, its tokens' logprobs).")
    suffix: str | None = Field(None, description="Not served: refused with 400 unless empty.")

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts, each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]  # type: ignore[list-item]
        return p  # type: ignore[return-value]


OpenAIFinishReason = Literal["stop", "length", "tool_calls"]


class OpenAIAssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = Field(description="null when the answer is only tool calls.")
    tool_calls: list[ToolCallItem] | None = None


class OpenAIChoice(BaseModel):
    index: int
    message: OpenAIAssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: OpenAIFinishReason


class _OpenAIObject(BaseModel):
    """What every OpenAI generation answer (and stream chunk) starts with."""

    id: str
    created: int  # Unix seconds
    model: str


class OpenAIChatResponse(_OpenAIObject):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[OpenAIChoice]
    usage: Usage


class ToolCallDelta(ToolCallItem):
    """A tool call in a stream: each call is sent whole, in one delta, at its ``index``."""

    index: int


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: OpenAIFinishReason | None = None


class OpenAIChatChunk(_OpenAIObject):
    """One SSE event of a streamed chat completion. Per choice: a first event with the role, events
    with content (and its logprobs), one with ``finish_reason``; then, with
    ``stream_options.include_usage``, one with no choices and ``usage``; then ``[DONE]``."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class LegacyLogprobs(BaseModel):
    """OpenAI's legacy logprobs: parallel lists over the tokens of the choice's text."""

    tokens: list[str]
    token_logprobs: list[float | None]  # None for the first prompt token (echo)
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]  # character offset of each token in the choice's text


class LegacyChoice(BaseModel):
    text: str
    index: int  # prompt index * n + choice index
    logprobs: LegacyLogprobs | None = None
    finish_reason: OpenAIFinishReason | None


class LegacyCompletionResponse(_OpenAIObject):
    """``POST /v1/completions``; as a stream, each SSE event is one of these with ``object``
    ``text_completion``, new text per choice, then (with include_usage) a usage event, then ``[DONE]``."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[LegacyChoice]
    usage: Usage | None = None


class StreamError(BaseModel):
    """The last event of a stream whose generation failed (then ``[DONE]``)."""

    error: ErrorDetail


class TokenizeRequest(_Strict):
    """``POST /tokenize`` (vLLM's shape): a ``prompt`` or chat ``messages`` (rendered with the chat
    template and its generation prompt)."""

    model: str | None = None
    prompt: str | None = Field(None, max_length=MAX_CONTENT_CHARS)
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = Field(True, description="For a prompt: add the tokenizer's BOS etc.")
    return_token_strs: bool = Field(False, description="Also return each token decoded on its own.")

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int | None
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]] = Field(max_length=1_000_000)


class DetokenizeResponse(BaseModel):
    prompt: str


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "model-serving"


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]
