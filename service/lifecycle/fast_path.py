"""The fast path: weight-only int4 quantization of a loaded model's linear layers, done while warming.

At batch 1 a decode step on CPU is bound by the bytes of weights it reads: about 270 MB per token for
the bundled model in bf16. torchao's int4 CPU layout (groups of 32 input channels, one bf16 scale and
zero point per group, run by PyTorch's ``_weight_int4pack_mm_for_cpu`` kernel) reads about a quarter
of that. The bundled weights were Q4_1 (groups of 32, ``scale * q + min``) before they were
dequantized to bf16, and a min-max asymmetric int4 grid over the same groups is that grid again, so
the fast path computes nearly what the bf16 path does. The lm head stays as loaded (see
:func:`_linears`).

It applies where the kernel exists (CPU, bf16 weights, linear layers whose input width is a multiple
of the group size); anywhere else, or when quantizing or its check fails, the model serves as loaded,
and :class:`~service.handle.FastPath` says why (``GET /model``).
"""

from __future__ import annotations

import logging
from typing import Any

from service.handle import FastPath, ModelHandle

log = logging.getLogger(__name__)

#: Input channels per int4 group: Q4_1's block size, so the bundled weights are held exactly.
GROUP_SIZE = 32
KIND = "int4_weight_only"


def prepare(handle: ModelHandle, quantization: str) -> FastPath:
    """Quantize ``handle.model`` in place unless ``quantization`` is "none" or it cannot apply (see the
    module docstring); return what was done. Never raises for a model it cannot speed up: on any failure
    the original weights are put back and the model serves as loaded."""
    if quantization == "none":
        return FastPath(False, "none", "SERVING_QUANTIZATION=none")
    reason = _unsupported(handle)
    if reason:
        return FastPath(False, "none", reason)
    import torch

    linears = _linears(handle.model)
    originals = {module: module.weight for module in linears}
    probe = torch.tensor([handle.encode_chat([{"role": "user", "content": "Hello"}])])
    try:
        with torch.inference_mode():
            expected = handle.model(input_ids=probe).logits[0, -1].argmax()
            _quantize(handle.model, linears)
            got = handle.model(input_ids=probe).logits[0, -1].argmax()
        if int(got) != int(expected):
            raise ValueError("its next token for a test prompt differs from the unquantized model's")
    except Exception as exc:  # any failure of a model class we cannot speed up: serve it as loaded
        for module, weight in originals.items():
            module.weight = weight
        log.warning("fast path not applied", extra={"error": f"{type(exc).__name__}: {exc}"})
        return FastPath(False, "none", f"int4 quantization failed: {type(exc).__name__}: {exc}")
    return FastPath(True, KIND, f"{len(linears)} linear layers, groups of {GROUP_SIZE}")


def _unsupported(handle: ModelHandle) -> str | None:
    if handle.info.device != "cpu":
        return f"int4 weight-only kernel is the CPU one; device {handle.info.device} serves unquantized"
    if handle.info.dtype != "bfloat16":
        return f"int4 weight-only kernel needs bfloat16 weights, not {handle.info.dtype}"
    try:
        import torchao  # noqa: F401
    except ImportError:
        return "torchao is not installed"
    if not _linears(handle.model):
        return f"no linear layer with an input width divisible by {GROUP_SIZE}"
    return None


def _linears(model: Any) -> list[Any]:
    """The linear layers to quantize: all but the lm head. The bundled model's head is its Q8_0 token
    embedding (tied), which int4 would not hold: quantizing it changed 18 of 20 greedy answers."""
    import torch

    head = model.get_output_embeddings()
    return [
        module
        for module in model.modules()
        if type(module) is torch.nn.Linear and module is not head and module.in_features % GROUP_SIZE == 0
    ]


def _quantize(model: Any, linears: list[Any]) -> None:
    from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import quantize_

    chosen = set(linears)
    config = PrototypeInt4WeightOnlyConfig(group_size=GROUP_SIZE)
    quantize_(model, config, filter_fn=lambda module, _fqn: module in chosen)
