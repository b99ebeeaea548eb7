"""Generation engine: continuous batching over the serving model, streaming, backpressure."""

from service.engine.engine import Engine
from service.engine.stream import GenerationStream
from service.engine.types import (
    EngineDeadError,
    EngineError,
    EngineStoppedError,
    FinishReason,
    GenerationResult,
    QueueFullError,
    RequestTimings,
    SamplingParams,
    TokenDelta,
    Usage,
)

__all__ = [
    "Engine",
    "EngineDeadError",
    "EngineError",
    "EngineStoppedError",
    "FinishReason",
    "GenerationResult",
    "GenerationStream",
    "QueueFullError",
    "RequestTimings",
    "SamplingParams",
    "TokenDelta",
    "Usage",
]
