"""A model deployment's record: its phase, timings, progress and outcome, as ``GET /status`` shows it."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any


class Phase(StrEnum):
    PENDING = "pending"
    RESOLVING = "resolving"
    DOWNLOADING = "downloading"
    LOADING = "loading"
    WARMING = "warming"
    READY = "ready"
    FAILED = "failed"


TERMINAL_PHASES = frozenset({Phase.READY, Phase.FAILED})


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Deployment:
    model_id: str
    revision: str | None
    trigger: str  # "startup", "restore", "api" or "fleet" (cluster mode)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    phase: Phase = Phase.PENDING
    created_at: datetime = field(default_factory=_now)
    finished_at: datetime | None = None
    error: str | None = None
    bytes_done: int = 0
    bytes_total: int | None = None
    phase_seconds: dict[str, float] = field(default_factory=dict)
    _phase_started: float = field(default_factory=time.monotonic, repr=False)
    _started: float = field(default_factory=time.monotonic, repr=False)

    @property
    def finished(self) -> bool:
        return self.phase in TERMINAL_PHASES

    @property
    def duration_s(self) -> float:
        return (
            round(time.monotonic() - self._started, 3) if not self.finished else self.phase_seconds["total"]
        )

    def enter(self, phase: Phase, error: str | None = None) -> None:
        now = time.monotonic()
        self.phase_seconds[self.phase.value] = round(now - self._phase_started, 3)
        self.phase, self._phase_started, self.error = phase, now, error
        if phase in TERMINAL_PHASES:
            self.finished_at = _now()
            self.phase_seconds["total"] = round(now - self._started, 3)

    def as_dict(self) -> dict[str, Any]:
        progress = None
        if self.phase is Phase.DOWNLOADING or self.bytes_done:
            progress = {
                "bytes_done": self.bytes_done,
                "bytes_total": self.bytes_total,
                "fraction": round(self.bytes_done / self.bytes_total, 4) if self.bytes_total else None,
            }
        return {
            "id": self.id,
            "model_id": self.model_id,
            "revision": self.revision,
            "trigger": self.trigger,
            "phase": self.phase.value,
            "error": self.error,
            "progress": progress,
            "created_at": self.created_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "duration_s": self.duration_s,
            "phase_seconds": dict(self.phase_seconds),
        }
