"""Persistence of the last successfully deployed model, so a restarted server serves it again."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

STATE_FILE = "serving-state.json"


@dataclass(frozen=True)
class ServedModelRecord:
    model_id: str
    revision: str | None = None


class StateStore:
    """Reads and atomically writes ``<state_dir>/serving-state.json``."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir.expanduser() / STATE_FILE

    def load(self) -> ServedModelRecord | None:
        try:
            data = json.loads(self.path.read_text())
            return ServedModelRecord(model_id=str(data["model_id"]), revision=data.get("revision"))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable state file", extra={"path": str(self.path), "error": str(exc)})
            return None

    def save(self, record: ServedModelRecord) -> None:
        """Write via temp file + fsync + rename: a crash leaves the old file or the new, never half."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".state-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(asdict(record), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
