"""Where a model comes from: a HuggingFace hub id, a local directory, or the bundled alias.

``check`` runs before a deployment is accepted (cheap checks that map to a 4xx answer);
``fetch`` runs inside the deployment and returns a local folder, downloading if needed.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from service.lifecycle import bundled

#: org/name as the hub accepts it.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}/[\w.\-]{1,96}$")
#: Files a causal-LM deployment needs; everything else in a repo (other weight formats, images) is skipped.
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]

ProgressCallback = Callable[[int, int | None], None]  # (bytes done, bytes total or None)


class SourceKind(StrEnum):
    HUB = "hub"
    LOCAL = "local"
    BUNDLED = "bundled"


class SourceError(Exception):
    """A model reference that cannot be served; ``status`` is the HTTP status it maps to."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ModelSource:
    model_id: str
    kind: SourceKind
    revision: str | None = None


def classify(model_id: str, revision: str | None = None, model_root: Path | None = None) -> ModelSource:
    """Which kind of source ``model_id`` names; a folder of that name under the root beats a hub id."""
    if bundled.is_bundled(model_id):
        return ModelSource(model_id, SourceKind.BUNDLED)
    is_path = model_id.startswith(("/", ".", "~")) or (
        model_root is not None and (model_root.expanduser() / model_id).is_dir()
    )
    if not is_path and _HUB_ID.match(model_id):
        return ModelSource(model_id, SourceKind.HUB, revision)
    return ModelSource(model_id, SourceKind.LOCAL)


def check_allowed(model_id: str, patterns: list[str]) -> None:
    if patterns and not any(fnmatch.fnmatchcase(model_id, p) for p in patterns):
        raise SourceError(f"model {model_id!r} is not in the allowlist of this server", 403)


def check_local_path(model_id: str, root: Path | None) -> Path:
    """Resolve a local model path, confined to ``root`` (symlinks and ``..`` resolved first)."""
    if root is None:
        raise SourceError("local-path deployments are disabled on this server (set SERVING_MODEL_ROOT)", 403)
    resolved_root = root.expanduser().resolve()
    path = Path(model_id).expanduser()
    path = (path if path.is_absolute() else resolved_root / path).resolve()
    if not path.is_relative_to(resolved_root):
        raise SourceError(f"local model paths must lie inside the model root {str(resolved_root)!r}", 403)
    if not path.is_dir():
        raise SourceError(f"local model directory {model_id!r} does not exist", 404)
    return path


def check_hub_exists(source: ModelSource) -> None:
    """404 for a hub repo that is neither in the local cache (offline) nor on the hub (online)."""
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        if constants.HF_HUB_OFFLINE:
            snapshot_download(source.model_id, revision=source.revision, local_files_only=True)
        else:
            HfApi().model_info(source.model_id, revision=source.revision, timeout=10)
    except (RepositoryNotFoundError, RevisionNotFoundError, LocalEntryNotFoundError) as exc:
        where = "in the offline cache" if constants.HF_HUB_OFFLINE else "on the hub"
        raise SourceError(
            f"model {source.model_id!r} (revision {source.revision or 'main'}) not found {where}", 404
        ) from exc


def fetch(source: ModelSource, *, cache_dir: Path, on_progress: ProgressCallback) -> Path:
    """A local folder holding the model's files (downloads from the hub with progress when needed)."""
    if source.kind is SourceKind.BUNDLED:
        return bundled.ensure_converted(cache_dir)
    if source.kind is SourceKind.LOCAL:
        return Path(source.model_id).expanduser().resolve()
    return _download(source, on_progress)


def _download(source: ModelSource, on_progress: ProgressCallback) -> Path:
    from huggingface_hub import snapshot_download
    from tqdm.auto import tqdm

    class _ReportingTqdm(tqdm):
        # huggingface_hub drives two byte bars: "Downloading bytes" (network transfer, its total a
        # running estimate) and the bytes written, whose total is the files' sizes: report the latter.
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            self._reports = self.unit == "B" and self.desc != "Downloading bytes"

        def update(self, n: float | None = 1) -> bool | None:
            shown = super().update(n)
            if self._reports:
                on_progress(int(self.n), int(self.total) if self.total else None)
            return shown

    return Path(
        snapshot_download(
            source.model_id,
            revision=source.revision,
            allow_patterns=_HUB_PATTERNS,
            tqdm_class=_ReportingTqdm,
        )
    )
