"""Turning a local model folder into a warmed-up :class:`ModelHandle`. Runs in a worker thread."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.handle import ModelHandle, ModelInfo
from service.lifecycle.sources import ModelSource, ProgressCallback, SourceError

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class LoadError(Exception):
    """The model files are unusable (corrupt, incomplete, unsupported); the message says why."""


def count_parameters(model_dir: Path) -> int:
    """Parameters in the folder's safetensors files, read from their headers without loading weights."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise LoadError(f"no *.safetensors weights in {model_dir.name!r} (other formats are not loaded)")
    total = 0
    for file in files:
        try:
            with file.open("rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
        except (struct.error, ValueError, OSError) as exc:
            raise LoadError(f"unreadable safetensors header in {file.name}: {exc}") from exc
        total += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    return total


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise LoadError("device 'cuda' was asked for but CUDA is not available")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    import torch

    if device == "cuda" and not torch.cuda.is_bf16_supported():
        return "float16"
    return "bfloat16"


def check_memory_budget(parameters: int, dtype: str, budget_bytes: int | None) -> None:
    needed = parameters * _DTYPE_BYTES[dtype]
    if budget_bytes is not None and needed > budget_bytes:
        raise SourceError(
            f"model needs {needed / 2**20:.0f} MiB for its weights in {dtype}, over the memory budget of "
            f"{budget_bytes / 2**20:.0f} MiB (SERVING_MAX_MODEL_BYTES)",
            413,
        )


class _TensorProgress:
    """Stands in for transformers' "Loading weights" bar: reports tensors loaded as the loop advances."""

    def __init__(self, bar: Any, total: int | None, on_progress: ProgressCallback) -> None:
        self._bar, self._total, self._on_progress = bar, total, on_progress

    def __iter__(self) -> Iterator[Any]:
        for done, item in enumerate(self._bar, start=1):
            yield item
            # The caller asked for the next tensor: this one is loaded.
            self._on_progress(done, self._total)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bar, name)

    def __enter__(self) -> _TensorProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()


@contextmanager
def _reporting_tensor_loads(on_progress: ProgressCallback) -> Iterator[None]:
    """Route transformers' weight-loading progress to ``on_progress`` (its public tqdm hook, as
    ``transformers serve`` does). The hook is process-wide: deployments run one at a time."""
    from transformers.utils import logging as hf_logging

    def hook(factory: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        bar = factory(*args, **kwargs)
        if kwargs.get("desc") != "Loading weights":
            return bar
        items = args[0] if args else kwargs.get("iterable")
        return _TensorProgress(bar, len(items) if hasattr(items, "__len__") else None, on_progress)

    previous = hf_logging.set_tqdm_hook(hook)
    try:
        yield
    finally:
        hf_logging.set_tqdm_hook(previous)


def load(
    model_dir: Path, source: ModelSource, *, device: str, dtype: str, on_progress: ProgressCallback
) -> ModelHandle:
    """Load weights and tokenizer (never with remote code) onto ``device``; ``on_progress`` gets
    (tensors loaded, tensors in all) as the weights load."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        with _reporting_tensor_loads(on_progress):
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=getattr(torch, dtype), trust_remote_code=False, local_files_only=True
            )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise LoadError(f"cannot load model from {model_dir.name!r}: {exc}") from exc
    if not getattr(tokenizer, "chat_template", None):
        raise LoadError("the tokenizer has no chat template, so chat messages cannot be rendered")
    model.to(device).eval()
    eos = model.generation_config.eos_token_id if model.generation_config else None
    eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    info = ModelInfo(
        model_id=source.model_id,
        revision=source.revision,
        source=source.kind.value,
        dtype=dtype,
        device=device,
        parameters=sum(p.numel() for p in model.parameters()),
        loaded_at=datetime.now(UTC),
        path=str(model_dir),
        context_length=getattr(model.config, "max_position_embeddings", None),
    )
    return ModelHandle(info=info, model=model, tokenizer=tokenizer, eos_token_ids=frozenset(eos_ids))


def weight_bytes(handle: ModelHandle) -> int:
    """Bytes the model's weights take in memory: its state dict, parameters and persistent buffers (the
    fast path's blocks are buffers), a tensor shared by two modules (a tied lm head's) counted once."""
    tensors = {id(t): t for t in handle.model.state_dict(keep_vars=True).values()}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def warm_up(handle: ModelHandle) -> None:
    """One short greedy generation: exercises the chat template and the kernels before traffic arrives."""
    import torch

    ids = handle.encode_chat([{"role": "user", "content": "Hello"}])
    with torch.inference_mode():
        try:
            handle.model.generate(
                torch.tensor([ids], device=handle.model.device),
                max_new_tokens=2,
                do_sample=False,
                pad_token_id=handle.tokenizer.pad_token_id or next(iter(handle.eos_token_ids), 0),
            )
        except (RuntimeError, ValueError, IndexError) as exc:
            raise LoadError(f"warm-up generation failed: {exc}") from exc
