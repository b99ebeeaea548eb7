"""The CPU fast path: serve a model converted from a Q4_1 GGUF from its Q4_1 blocks, not its bf16 copy.

Decode at batch 1 on a CPU is bound by the bytes of weights read per token. The bundled model's
bf16 weights are the exact dequantization of the GGUF's Q4_1 blocks, so converting it also keeps the
blocks (``q4_1.safetensors`` beside the weights, keyed by module name), and deploying it swaps each
such linear layer for :class:`~service.kernels.q4_1.Q4_1Linear` during warm-up, after checking that
the blocks expand to that layer's weights bit for bit. Where anything is missing (another model, a
GPU, no C compiler, a CPU without AVX-512, a mismatch), the model serves as loaded and
:class:`FastPath` says why.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
from pathlib import Path
from typing import Any

from service.handle import FastPath

log = logging.getLogger(__name__)

#: The blocks' file inside a converted model folder.
BLOCKS_FILE = "q4_1.safetensors"

#: GGUF names in a llama-family block (``blk.<i>.<name>.weight``) -> module in ``model.layers.<i>``.
_LLAMA_LINEARS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def write_blocks(gguf_file: Path, model: Any, target: Path) -> int:
    """Save the Q4_1 blocks of ``gguf_file`` whose expansion equals a linear layer of ``model`` (the bf16
    model transformers made from that file) into the safetensors file ``target``; return how many.

    transformers reorders the rows of llama's q and k projections when it reads a GGUF (rotary
    layout); each tensor is tried as stored and reordered both ways, and kept only if it matches.
    """
    import numpy as np
    import torch
    from gguf import GGUFReader
    from safetensors.torch import save_file

    from service.kernels.q4_1 import BLOCK_BYTES, dequantize_reference, fits

    config = model.config
    heads = {config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads)}
    found: dict[str, torch.Tensor] = {}
    for tensor in GGUFReader(gguf_file).tensors:
        parts = tensor.name.split(".")
        if tensor.tensor_type.name != "Q4_1" or len(parts) != 4 or parts[2] not in _LLAMA_LINEARS:
            continue
        name = f"model.layers.{parts[1]}.{_LLAMA_LINEARS[parts[2]]}"
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            continue
        if not fits(linear):
            continue
        rows = linear.out_features
        blocks = torch.from_numpy(np.array(tensor.data, dtype=np.uint8)).reshape(rows, -1, BLOCK_BYTES)
        candidates = [blocks] + [_unpermute(blocks, h) for h in sorted(heads) if rows % (2 * h) == 0]
        for candidate in candidates:
            if candidate.shape[1] * 32 == linear.in_features and torch.equal(
                dequantize_reference(candidate), linear.weight.data
            ):
                found[name] = candidate.contiguous()
                break
    if found:
        save_file(found, str(target))
    return len(found)


def _unpermute(rows: Any, heads: int) -> Any:
    """transformers' ``reverse_permute_weights`` for llama's q/k rows, applied to whole block rows."""
    n = rows.shape[0]
    return rows.reshape(heads, n // heads // 2, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def install(model: Any, model_dir: Path, cache_dir: Path) -> FastPath:
    """Swap every linear layer of ``model`` that has Q4_1 blocks in ``model_dir`` for the kernel's
    layer; return what was done. Never raises for a model it cannot speed up."""
    import torch

    from service.kernels.build import KernelUnavailableError
    from service.kernels.q4_1 import Q4_1Kernels, Q4_1Linear

    path = model_dir / BLOCKS_FILE
    if not path.is_file():
        return FastPath(None, reason="no Q4_1 blocks beside the weights (a Q4_1 GGUF's conversion has them)")
    if model.device.type != "cpu" or model.dtype != torch.bfloat16:
        return FastPath(None, reason=f"the kernel serves bf16 on CPU, not {model.dtype} on {model.device}")
    try:
        kernels = Q4_1Kernels(cache_dir)
    except KernelUnavailableError as exc:
        return FastPath(None, reason=f"Q4_1 kernel unavailable: {exc}")
    from safetensors.torch import load_file

    swapped, mismatched = 0, []
    for name, blocks in load_file(str(path)).items():
        parent, _, child = name.rpartition(".")
        linear = model.get_submodule(name)
        if not isinstance(linear, torch.nn.Linear) or not _expands_to(kernels, blocks, linear.weight):
            mismatched.append(name)
            continue
        layer = Q4_1Linear(blocks, kernels)
        setattr(model.get_submodule(parent), child, layer)
        swapped += 1
    if swapped:
        gc.collect()
        with contextlib.suppress(OSError):  # not glibc
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the freed copies back to the OS
    reason = f"{len(mismatched)} layers' blocks do not expand to their weights: {mismatched[:3]}"
    return FastPath("q4_1" if swapped else None, swapped, reason if mismatched else None)


def _expands_to(kernels: Any, blocks: Any, weight: Any) -> bool:
    """Whether the first, middle and last rows of ``blocks`` expand to those rows of ``weight``.

    Conversion checked every weight (:func:`write_blocks`); this catches a stale or foreign blocks file
    without reading the rest of the bf16 weights, which stay unread in the file's memory map (reading
    them all would hold both copies in memory at once).
    """
    import torch

    from service.kernels.q4_1 import BLOCK

    if blocks.shape[0] != weight.shape[0] or blocks.shape[1] * BLOCK != weight.shape[1]:
        return False
    rows = torch.tensor(sorted({0, weight.shape[0] // 2, weight.shape[0] - 1}))
    return torch.equal(kernels.dequantize(blocks[rows].contiguous()), weight[rows])
