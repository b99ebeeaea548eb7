"""A Llama model's decode step, one kernel call per decoder layer (``llama_decode_layer``, ``gguf_blocks.c``).

At batch 1 on a CPU, transformers' eager Llama spends more time in its ~40 PyTorch operators per layer
(and their Python) than in reading the weights: ~12 of ~22 ms per token for the bundled 135M model once
its linear layers are :class:`~service.kernels.gguf_blocks.BlockLinear`. :class:`FusedDecoder` runs the
same arithmetic, with the same bf16 roundings, in one C call per layer; the embedding, the rotary
tables, the final norm and the lm head stay PyTorch's.

The KV cache stays transformers' ``DynamicCache`` (the batch's splicing and trimming keep working on
it), but each layer's keys and values become views of a buffer with room to the right, so the new
column is written in place instead of a ``torch.cat`` per layer and token.
"""

from __future__ import annotations

import ctypes
import weakref
from typing import Any

import torch

from service.kernels.gguf_blocks import GEMM_ROWS, BlockKernels, BlockLinear

#: Order of the projections in ``DecoderLayer.proj`` (``gguf_blocks.c``).
PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
#: ``gguf_blocks.c`` keeps a head's vectors in registers and on the stack, 16 lanes at a time.
MAX_HEAD_DIM = 512
#: Cache columns added beyond the need when a layer's buffer is (re)made: one copy per this many tokens.
ROOM = 64


class _DecoderLayer(ctypes.Structure):
    _fields_ = [
        *(
            (name, ctypes.c_int64)
            for name in ("rows", "hidden", "heads", "kv_heads", "head_dim", "intermediate")
        ),
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
        ("input_norm", ctypes.c_void_p),
        ("post_norm", ctypes.c_void_p),
        ("proj", ctypes.c_void_p * 7),
        ("fmt", ctypes.c_int32 * 7),
        ("cos", ctypes.c_void_p),
        ("sin", ctypes.c_void_p),
        ("keys", ctypes.c_void_p),
        ("values", ctypes.c_void_p),
        ("row_stride", ctypes.c_int64),
        ("head_stride", ctypes.c_int64),
        ("column", ctypes.c_int64),
        ("mask", ctypes.c_void_p),
        ("threads", ctypes.c_int32),
    ]


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def unfit_reason(model: Any) -> str | None:
    """Why :class:`FusedDecoder` cannot run ``model`` (None if it can): it takes a ``llama`` model without
    biases, with SiLU, whose seven projections per layer are all :class:`BlockLinear`."""
    config = model.config
    if config.model_type != "llama":
        return f"fused decode layers are written for Llama, not {config.model_type}"
    if (
        config.hidden_act != "silu"
        or getattr(config, "attention_bias", False)
        or getattr(config, "mlp_bias", False)
    ):
        return "fused decode layers need SiLU and bias-free projections"
    head_dim = _head_dim(config)
    if head_dim > MAX_HEAD_DIM or head_dim % 16:
        return f"fused decode layers take heads of a multiple of 16 up to {MAX_HEAD_DIM}, not {head_dim}"
    for i, layer in enumerate(model.model.layers):
        kinds = [type(layer.get_submodule(name)) for name in PROJECTIONS]
        if any(kind is not BlockLinear for kind in kinds):
            return f"layer {i} has projections the block kernel does not serve"
    return None


class FusedDecoder:
    """Decode steps of a Llama whose projections are all :class:`BlockLinear` (see :func:`unfit_reason`).

    Call it as the batch calls the model at decode: ``ids`` ``[rows, 1]``, ``mask`` ``[rows, columns]``
    (0 on left padding; the last column is the new token), ``positions`` ``[rows, 1]``, and the
    ``DynamicCache`` holding ``columns - 1`` positions; returns the logits ``[rows, vocab]`` bf16 and
    leaves the cache holding ``columns``. Raises ``ValueError`` for more rows than :attr:`max_rows` (the
    model's own forward, whose linear layers then take PyTorch's GEMM, is faster there), ``MemoryError``
    if the kernel's buffers cannot be allocated.
    """

    #: The most rows a step takes.
    max_rows = GEMM_ROWS - 1

    def __init__(self, model: Any, kernels: BlockKernels) -> None:
        config, decoder = model.config, model.model
        self._model = model
        self._kernels = kernels
        head_dim = _head_dim(config)
        self._layers = []
        for layer in decoder.layers:
            blocks = [layer.get_submodule(name) for name in PROJECTIONS]
            norms = (
                layer.input_layernorm.weight.contiguous(),
                layer.post_attention_layernorm.weight.contiguous(),
            )
            args = _DecoderLayer(
                hidden=config.hidden_size,
                heads=config.num_attention_heads,
                kv_heads=config.num_key_value_heads,
                head_dim=head_dim,
                intermediate=config.intermediate_size,
                eps=layer.input_layernorm.variance_epsilon,
                scale=layer.self_attn.scaling,
                input_norm=norms[0].data_ptr(),
                post_norm=norms[1].data_ptr(),
                proj=(ctypes.c_void_p * 7)(*(b.blocks.data_ptr() for b in blocks)),
                fmt=(ctypes.c_int32 * 7)(*(b.format.code for b in blocks)),
            )
            self._layers.append((args, norms))  # the norms' tensors must outlive the pointers to them
        self._kv_heads, self._head_dim = config.num_key_value_heads, head_dim
        # Per cache layer: the buffers its keys and values are views of.
        self._room: weakref.WeakKeyDictionary[Any, tuple[torch.Tensor, torch.Tensor]] = (
            weakref.WeakKeyDictionary()
        )

    def __call__(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        rows, columns = mask.shape
        if rows > self.max_rows:
            raise ValueError(f"fused decode layers take at most {self.max_rows} rows, not {rows}")
        decoder = self._model.model
        hidden = decoder.embed_tokens(ids).reshape(rows, -1).contiguous()
        cos, sin = (t.reshape(rows, -1).contiguous() for t in decoder.rotary_emb(hidden, positions))
        mask = mask.contiguous()
        threads = torch.get_num_threads()
        for (args, _), cache_layer in zip(self._layers, cache.layers, strict=True):
            keys, values = self._with_room(cache_layer, rows, columns)
            args.rows, args.threads, args.column = rows, threads, columns - 1
            args.cos, args.sin, args.mask = cos.data_ptr(), sin.data_ptr(), mask.data_ptr()
            args.keys, args.values = keys.data_ptr(), values.data_ptr()
            args.row_stride, args.head_stride = keys.stride(0), keys.stride(1)
            self._kernels.decode_layer(ctypes.byref(args), hidden)
            cache_layer.keys, cache_layer.values = keys[:, :, :columns], values[:, :, :columns]
        return self._model.lm_head(decoder.norm(hidden))

    def _with_room(self, layer: Any, rows: int, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Buffers ``[rows, kv_heads, capacity >= columns, head_dim]`` whose first ``columns - 1`` columns
        are ``layer``'s keys and values (copied there if they are not already views of them)."""
        held = self._room.get(layer)
        past = columns - 1
        if (
            held is not None
            and held[0].shape[0] == rows
            and held[0].shape[2] >= columns
            and layer.keys.data_ptr() == held[0].data_ptr()
            and layer.values.data_ptr() == held[1].data_ptr()
            and layer.keys.shape[2] == past
        ):
            return held
        buffers = []
        for old in (layer.keys, layer.values):
            buffer = old.new_empty((rows, self._kv_heads, columns + ROOM, self._head_dim))
            buffer[:, :, :past].copy_(old)
            buffers.append(buffer)
        held = self._room[layer] = (buffers[0], buffers[1])
        return held
