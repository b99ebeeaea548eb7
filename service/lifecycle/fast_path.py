"""The CPU fast path: serve a model converted from a GGUF from its llama.cpp blocks, not its bf16 copy.

Decode at batch 1 on a CPU is bound by the bytes of weights read per token. The bundled model's
bf16 weights are the exact dequantization of the GGUF's blocks (Q4_1 for the decoder layers, Q8_0
for the tied embedding that is also the lm head), so converting it also keeps the blocks
(``gguf_blocks.safetensors`` beside the weights, keyed by module name), and deploying it swaps each
such linear layer for :class:`~service.kernels.gguf_blocks.BlockLinear` during warm-up, and an embedding
tied to the lm head for :class:`~service.kernels.gguf_blocks.BlockEmbedding` on the head's blocks. A
Llama whose projections all became block layers also decodes through
:class:`~service.kernels.llama_decode.FusedDecoder`, one kernel call per decoder layer. Where
anything is missing (another model, a GPU, no C compiler, a CPU without AVX-512, a mismatch), the
model serves as loaded and :class:`~service.handle.FastPath` says why.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import gc
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from service.handle import FastPath

log = logging.getLogger(__name__)

#: The blocks' file inside a converted model folder.
BLOCKS_FILE = "gguf_blocks.safetensors"
KERNEL = "gguf_blocks"

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
#: Whole-model GGUF tensors -> module: the output head, or the embedding it is tied to.
_HEAD = {"output.weight": "lm_head", "token_embd.weight": "lm_head"}


def write_blocks(gguf_file: Path, model: Any, target: Path) -> int:
    """Save the Q4_1 and Q8_0 blocks of ``gguf_file`` whose expansion equals a linear layer of
    ``model`` (the bf16 model transformers made from that file) into the safetensors file ``target``;
    return how many. Every weight of every saved layer is checked.

    transformers reorders the rows of llama's q and k projections when it reads a GGUF (rotary
    layout); each tensor is tried as stored and reordered both ways, and kept only if it matches.
    """
    import numpy as np
    import torch
    from gguf import GGUFReader
    from safetensors.torch import save_file

    from service.kernels.gguf_blocks import BlockFormat, dequantize_reference, fits

    config = model.config
    heads = {config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads)}
    formats = {fmt.name: fmt for fmt in BlockFormat}
    found: dict[str, torch.Tensor] = {}
    for tensor in GGUFReader(gguf_file).tensors:
        name = _module_of(tensor.name)
        fmt = formats.get(tensor.tensor_type.name)
        if name is None or fmt is None or name in found:
            continue
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            continue
        if not fits(linear):
            continue
        rows = linear.out_features
        data = np.array(tensor.data, dtype=np.uint8)
        blocks = torch.from_numpy(data).reshape(rows, -1, fmt.block_bytes)
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


def _module_of(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LLAMA_LINEARS:
        return f"model.layers.{parts[1]}.{_LLAMA_LINEARS[parts[2]]}"
    return _HEAD.get(gguf_name)


def _unpermute(rows: Any, heads: int) -> Any:
    """transformers' ``reverse_permute_weights`` for llama's q/k rows, applied to whole block rows."""
    n = rows.shape[0]
    return rows.reshape(heads, n // heads // 2, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def install(model: Any, model_dir: Path, cache_dir: Path) -> tuple[FastPath, Any]:
    """Swap every linear layer of ``model`` that has blocks in ``model_dir`` for the kernel's layer;
    return what was done, and the fused decode step for the model's handle (``ModelHandle.decode_step``)
    or None. Never raises for a model it cannot speed up."""
    import torch

    from service.kernels import llama_decode
    from service.kernels.build import KernelUnavailableError
    from service.kernels.gguf_blocks import BlockKernels

    path = model_dir / BLOCKS_FILE
    if not path.is_file():
        return FastPath(None, reason="no GGUF blocks beside the weights (a GGUF's conversion has them)"), None
    if model.device.type != "cpu" or model.dtype != torch.bfloat16:
        return FastPath(
            None, reason=f"the kernel serves bf16 on CPU, not {model.dtype} on {model.device}"
        ), None
    try:
        kernels = BlockKernels(cache_dir)
    except KernelUnavailableError as exc:
        return FastPath(None, reason=f"kernel unavailable: {exc}"), None
    tied = _head_tied_to_embedding(model)
    report = _swap_layers(model, path, kernels)
    if tied:
        _embed_from_the_heads_blocks(model, kernels)
    if report.kernel is None or report.reason is not None:
        return report, None
    unfit = llama_decode.unfit_reason(model)
    if unfit is not None:
        return dataclasses.replace(report, reason=unfit), None
    fused = llama_decode.FusedDecoder(model, kernels)
    return dataclasses.replace(report, fused_layers=len(model.model.layers)), fused


def _swap_layers(model: Any, path: Path, kernels: Any) -> FastPath:
    import torch

    from service.kernels.gguf_blocks import BlockLinear

    swapped: collections.Counter[str] = collections.Counter()
    mismatched = []
    for name, blocks in _one_at_a_time(path):
        parent, _, child = name.rpartition(".")
        try:
            linear = model.get_submodule(name)
            layer = BlockLinear(blocks, kernels)
            packed = layer.blocks  # packed once, by the layer: the check reads its rows
            matches = isinstance(linear, torch.nn.Linear) and _expands_to(kernels, packed, linear.weight)
        except (AttributeError, ValueError):  # no such module; not a block layout
            matches = False
        if not matches:
            mismatched.append(name)
            continue
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        swapped[layer.format.name] += 1
    if swapped:
        # Weights that loading copied to the heap (a dtype conversion, a .bin file) are free now: hand
        # them back to the OS. Memory-mapped ones were never read.
        gc.collect()
        with contextlib.suppress(OSError):  # not glibc
            ctypes.CDLL("libc.so.6").malloc_trim(0)
    kernel, layers = (KERNEL if swapped else None), dict(sorted(swapped.items()))
    if mismatched:
        return FastPath(
            kernel,
            layers,
            f"{len(mismatched)} layers' blocks do not expand to their weights: {mismatched[:3]}",
        )
    return FastPath(kernel, layers)


def _head_tied_to_embedding(model: Any) -> bool:
    """Whether ``model``'s lm head holds its token embedding's weight (no: a model without either)."""
    try:
        weight = getattr(model.get_input_embeddings(), "weight", None)
    except NotImplementedError:  # transformers' answer for a model it cannot find the embedding of
        return False
    return weight is not None and getattr(model.get_output_embeddings(), "weight", None) is weight


def _embed_from_the_heads_blocks(model: Any, kernels: Any) -> None:
    """Once the lm head tied to ``model``'s embedding runs on blocks, look tokens up in those blocks too
    (:class:`~service.kernels.gguf_blocks.BlockEmbedding`). If only vectors (the norms) are left on the
    weights' memory map then, copy them out of it: the map closes, and with it every page of it that
    loading, the layers' checks and lookups had made resident (28 MiB of the bundled model's by the end
    of warm-up, 48 MiB after 16 varied requests; none now)."""
    import torch

    from service.kernels.gguf_blocks import BlockEmbedding, BlockLinear

    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if not isinstance(head, BlockLinear) or type(embedding) is not torch.nn.Embedding:
        return  # a subclass may scale or offset what it looks up (Gemma's does)
    model.set_input_embeddings(BlockEmbedding(head.blocks, kernels))
    if all(parameter.dim() == 1 for parameter in model.parameters()):
        for parameter in model.parameters():
            parameter.data = parameter.data.clone()


def _one_at_a_time(path: Path) -> Iterator[tuple[str, Any]]:
    """The tensors of a safetensors file, each from its own opening: a layer keeps a packed copy, and the
    file's memory map goes with each tensor instead of keeping every page that packing read resident
    until the last one (one map for all measured 56 MB over the served peak)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        names = list(file.keys())
    for name in names:
        with safe_open(str(path), framework="pt") as file:
            tensor = file.get_tensor(name)
        yield name, tensor


def _expands_to(kernels: Any, blocks: Any, weight: Any) -> bool:
    """Whether the first, middle and last rows of ``blocks`` (in the kernel's layout, as a
    :class:`~service.kernels.gguf_blocks.BlockLinear` holds them) expand to those rows of ``weight``.

    Conversion checked every weight (:func:`write_blocks`); this catches a stale or foreign blocks file
    without reading the rest of the bf16 weights, which stay unread in the file's memory map (reading
    them all would hold both copies in memory at once).
    """
    import torch

    from service.kernels.gguf_blocks import BLOCK

    if blocks.shape[0] != weight.shape[0] or blocks.shape[1] * BLOCK != weight.shape[1]:
        return False
    rows = torch.tensor(sorted({0, weight.shape[0] // 2, weight.shape[0] - 1}))
    return torch.equal(kernels.dequantize(blocks[rows]), weight[rows])
