"""Linear layers that keep their weights in llama.cpp's blocks (Q4_1, Q8_0) and multiply by them on CPU.

A model converted from a GGUF (the bundled one) has bf16 weights that are exactly the dequantization
of its blocks, ``bf16(d * q + m)`` for Q4_1 and ``bf16(q * d)`` for Q8_0; :class:`BlockLinear`
computes with those same values while reading 5 or 8.5 bits per weight instead of 16, which is what
bounds a CPU's decode step at batch 1 (memory bandwidth: 270 MB of bf16 weights per token for a
135M model). Layouts and rounding: ``gguf_blocks.c``.
"""

from __future__ import annotations

import ctypes
import enum
import threading
from pathlib import Path
from typing import Any

import torch

from service.kernels import build

SOURCE = Path(__file__).with_name("gguf_blocks.c")
#: ``-ffp-contract=off`` keeps ``d * q + m`` two roundings (no fused multiply-add), as the dequantizer
#: computed it; the kernel's weights are then bit-identical to the bf16 ones.
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mf16c", "-ffp-contract=off", "-fopenmp"]
CPU_NEEDS = {"avx512f", "avx512bw", "avx512vl", "f16c"}
#: Weights per block along the input dimension.
BLOCK = 32
#: From this many rows on (prefill) a layer expands its weights to bf16 and lets
#: PyTorch's GEMM run: faster there than the kernel, and bit-identical to the bf16 model.
GEMM_ROWS = 32


class BlockFormat(enum.Enum):
    """A ggml block type the kernel reads: its code in ``gguf_blocks.c``, its bytes per block in ggml's
    layout, and the bytes of fp16 scale (and minimum) that :func:`packed` widens to fp32."""

    Q4_1 = (0, 20, 4)
    Q8_0 = (1, 34, 0)

    def __init__(self, code: int, block_bytes: int, scale_bytes: int) -> None:
        self.code, self.block_bytes, self.scale_bytes = code, block_bytes, scale_bytes
        self.packed_bytes = block_bytes + scale_bytes

    @classmethod
    def of(cls, blocks: torch.Tensor) -> BlockFormat:
        """The format of ``blocks`` ``[N, K/32, bytes]`` in ggml's or the kernel's layout, told by its bytes
        per block."""
        for fmt in cls:
            if blocks.shape[-1] in (fmt.block_bytes, fmt.packed_bytes):
                return fmt
        raise ValueError(f"no block format has {blocks.shape[-1]} bytes per block")


def packed(blocks: torch.Tensor) -> torch.Tensor:
    """``blocks`` ``[N, K/32, bytes]`` in ggml's layout, in the kernel's: the same bytes, with a Q4_1
    block's fp16 scale and minimum widened to fp32 (24 bytes a block; see ``gguf_blocks.c``). Always a
    copy: a layer holding a view of the blocks file's memory map would keep every page of it that
    packing read resident (measured: +80 MB for the bundled model)."""
    fmt = BlockFormat.of(blocks)
    if blocks.shape[-1] != fmt.block_bytes:
        raise ValueError(
            f"{fmt.name} blocks in ggml's layout have {fmt.block_bytes} bytes, not {blocks.shape[-1]}"
        )
    if not fmt.scale_bytes:
        return blocks.clone(memory_format=torch.contiguous_format)
    scales = blocks[..., : fmt.scale_bytes].contiguous().view(torch.float16).float().view(torch.uint8)
    return torch.cat([scales, blocks[..., fmt.scale_bytes :]], dim=-1)


class BlockKernels:
    """The compiled kernels (built on first use, cached under ``cache_dir``); raises
    :class:`~service.kernels.build.KernelUnavailableError` where they cannot run."""

    def __init__(self, cache_dir: Path) -> None:
        lib = build.load(SOURCE, FLAGS, CPU_NEEDS, cache_dir)
        ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.blocks_linear.argtypes = [i32, ptr, i64, i64, ptr, i64, ptr, i32]
        lib.blocks_linear.restype = i32
        lib.blocks_dequantize.argtypes = [i32, ptr, i64, i64, ptr, i32]
        lib.blocks_dequantize.restype = None
        lib.llama_decode_layer.argtypes = [ptr, ptr]
        lib.llama_decode_layer.restype = i32
        self._lib = lib
        self._scratch = threading.local()

    def linear(self, x: torch.Tensor, blocks: torch.Tensor, fmt: BlockFormat) -> torch.Tensor:
        """``x`` ``[..., K]`` bf16, ``blocks`` ``[N, K/32, bytes]`` uint8 in the kernel's layout
        (:func:`packed`): ``[..., N]`` bf16."""
        _check_packed(blocks, fmt)
        x = x.contiguous()
        y = torch.empty(*x.shape[:-1], blocks.shape[0], dtype=torch.bfloat16)
        k = x.shape[-1]
        status = self._lib.blocks_linear(
            fmt.code, x.data_ptr(), x.numel() // k, k, blocks.data_ptr(), blocks.shape[0], y.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("the block kernel could not allocate its activation buffer")
        return y

    def dequantize(self, blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The ``[N, K]`` bf16 weights that ``blocks`` ``[N, K/32, bytes]`` in the kernel's layout
        (:func:`packed`) hold (into ``out`` if given)."""
        fmt = BlockFormat.of(blocks)
        _check_packed(blocks, fmt)
        n, columns = blocks.shape[0], blocks.shape[1] * BLOCK
        if out is None:
            out = torch.empty(n, columns, dtype=torch.bfloat16)
        threads = torch.get_num_threads()
        self._lib.blocks_dequantize(fmt.code, blocks.data_ptr(), n, columns, out.data_ptr(), threads)
        return out

    def decode_layer(self, layer: Any, x: torch.Tensor) -> None:
        """Run the decoder layer ``layer`` (a pointer to ``llama_decode_layer``'s arguments, see
        :mod:`service.kernels.llama_decode`) on ``x`` ``[rows, hidden]`` bf16 in place."""
        if self._lib.llama_decode_layer(layer, x.data_ptr()) != 0:
            raise MemoryError("the fused decode layer could not allocate its buffers")

    def scratch(self, elements: int) -> torch.Tensor:
        """A bf16 buffer of ``elements``, reused by this thread: expanding a layer's weights into memory
        already mapped (and likely cached) spares a page fault per 4 KiB on every call."""
        buffer = getattr(self._scratch, "buffer", None)
        if buffer is None or buffer.numel() < elements:
            buffer = self._scratch.buffer = torch.empty(elements, dtype=torch.bfloat16)
        return buffer[:elements]


def _check_packed(blocks: torch.Tensor, fmt: BlockFormat) -> None:
    if blocks.shape[-1] != fmt.packed_bytes or not blocks.is_contiguous():
        raise ValueError(
            f"the kernel reads contiguous {fmt.name} blocks of {fmt.packed_bytes} bytes (packed())"
        )


def dequantize_reference(blocks: torch.Tensor) -> torch.Tensor:
    """What gguf-py's dequantizer gives, rounded to bf16: ``[N, K]`` from blocks ``[N, K/32, bytes]`` in
    ggml's layout. Pure PyTorch (no kernel needed), for checking blocks against a model's weights."""
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()
    if BlockFormat.of(blocks) is BlockFormat.Q8_0:
        weights = blocks[..., 2:].contiguous().view(torch.int8).float() * d
    else:
        m = blocks[..., 2:4].contiguous().view(torch.float16).float()
        nibbles = blocks[..., 4:]
        weights = d * torch.cat([nibbles & 15, nibbles >> 4], dim=-1).float() + m
    return weights.to(torch.bfloat16).reshape(blocks.shape[0], blocks.shape[1] * BLOCK)


def fits(linear: torch.nn.Module) -> bool:
    """Whether ``linear`` has the shapes the kernel takes (no bias, ``N % 4 == 0``, ``K % 32 == 0``)."""
    return (
        isinstance(linear, torch.nn.Linear)
        and linear.bias is None
        and linear.out_features % 4 == 0
        and linear.in_features % BLOCK == 0
    )


class BlockLinear(torch.nn.Module):
    """Stands in for a bias-free ``nn.Linear`` ``[N, K]`` whose bf16 weights its ``blocks`` hold.

    Fewer than :data:`GEMM_ROWS` rows (decode) go through the kernel, which sums each output in fp32
    in its own order (within a few bf16 ulps of PyTorch's GEMM, whatever the batch); more rows go
    through PyTorch's GEMM on the expanded weights.
    """

    def __init__(self, blocks: torch.Tensor, kernels: BlockKernels) -> None:
        """``blocks`` ``[N, K/32, bytes]`` in ggml's layout (kept in the kernel's, :func:`packed`)."""
        super().__init__()
        self.register_buffer("blocks", packed(blocks))
        self.format = BlockFormat.of(blocks)
        self.in_features, self.out_features = blocks.shape[1] * BLOCK, blocks.shape[0]
        self._kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Decode runs this once per layer and token: the kernel's path stays free of reshapes.
        if x.dtype is torch.bfloat16 and x.numel() < GEMM_ROWS * self.in_features:
            return self._kernels.linear(x, self.blocks, self.format)
        scratch = self._kernels.scratch(self.out_features * self.in_features)
        weight = self._kernels.dequantize(self.blocks, scratch.view(self.out_features, self.in_features))
        # Contiguous: a strided input (the last position of each prompt, at prefill) sends bf16 GEMM
        # down a path measured at 981 ms and +550 MB for 12 rows of the lm head, against 7 ms.
        return torch.nn.functional.linear(x.contiguous(), weight.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, blocks={self.format.name}"


class BlockEmbedding(torch.nn.Module):
    """Stands in for an ``nn.Embedding`` ``[V, D]`` whose bf16 table its ``blocks`` hold: the table of a
    model whose lm head is tied to its embedding, served from the head's own blocks (shared, not copied).

    A token's row is expanded when it is looked up, to exactly the bf16 values of the table, so the table
    itself is never read: a memory map of it would keep every page a lookup touched resident (with
    Linux's fault-around, 64 KiB for a 1 KiB row), up to the whole 54 MiB of the bundled model's.
    """

    def __init__(self, blocks: torch.Tensor, kernels: BlockKernels) -> None:
        """``blocks`` ``[V, D/32, bytes]`` in the kernel's layout (:func:`packed`), e.g. a
        :class:`BlockLinear`'s."""
        super().__init__()
        _check_packed(blocks, BlockFormat.of(blocks))
        self.register_buffer("blocks", blocks)
        self.num_embeddings, self.embedding_dim = blocks.shape[0], blocks.shape[1] * BLOCK
        self._kernels = kernels

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids`` ``[...]`` int: ``[..., D]`` bf16."""
        rows = self._kernels.dequantize(self.blocks[ids.reshape(-1)])
        return rows.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, blocks={BlockFormat.of(self.blocks).name}"
