"""Linear layers that keep their weights in llama.cpp's Q4_1 blocks and multiply by them on the CPU.

A model converted from a Q4_1 GGUF (the bundled one) has bf16 weights that are exactly
``bf16(d * q + m)`` of its blocks; :class:`Q4_1Linear` computes with those same values while reading
5 bits per weight instead of 16, which is what bounds a CPU's decode step at batch 1 (memory
bandwidth: 270 MB of bf16 weights per token for a 135M model). Layout and rounding: ``q4_1.c``.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import torch

from service.kernels import build

SOURCE = Path(__file__).with_name("q4_1.c")
#: ``-ffp-contract=off`` keeps ``d * q + m`` two roundings (no fused multiply-add), as the dequantizer
#: computed it; the kernel's weights are then bit-identical to the bf16 ones.
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mf16c", "-ffp-contract=off", "-fopenmp"]
CPU_NEEDS = {"avx512f", "avx512bw", "avx512vl", "f16c"}
#: Weights per block along the input dimension, and bytes per block (fp16 d, fp16 m, 16 nibble bytes).
BLOCK, BLOCK_BYTES = 32, 20
#: From this many rows on (prefill, big batches) the layer expands its weights to bf16 and lets
#: PyTorch's GEMM run: faster there than the kernel, and bit-identical to the bf16 model.
GEMM_ROWS = 12


class Q4_1Kernels:
    """The compiled kernel (built on first use, cached under ``cache_dir``); raises
    :class:`~service.kernels.build.KernelUnavailableError` where it cannot run."""

    def __init__(self, cache_dir: Path) -> None:
        lib = build.load(SOURCE, FLAGS, CPU_NEEDS, cache_dir)
        ptr, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.q4_1_linear.argtypes = [ptr, i64, i64, ptr, i64, ptr, ctypes.c_int]
        lib.q4_1_linear.restype = ctypes.c_int
        lib.q4_1_dequantize.argtypes = [ptr, i64, i64, ptr, ctypes.c_int]
        lib.q4_1_dequantize.restype = None
        self._lib = lib
        self._scratch = threading.local()

    def linear(self, x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """``x`` ``[M, K]`` bf16 contiguous, ``blocks`` ``[N, K/32, 20]`` uint8; returns ``[M, N]`` bf16."""
        y = torch.empty(x.shape[0], blocks.shape[0], dtype=torch.bfloat16)
        status = self._lib.q4_1_linear(
            x.data_ptr(), x.shape[0], x.shape[1], blocks.data_ptr(), blocks.shape[0], y.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("the Q4_1 kernel could not allocate its activation buffer")
        return y

    def dequantize(self, blocks: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The ``[N, K]`` bf16 weights that ``blocks`` ``[N, K/32, 20]`` hold (into ``out`` if given)."""
        n, groups = blocks.shape[0], blocks.shape[1]
        if out is None:
            out = torch.empty(n, groups * BLOCK, dtype=torch.bfloat16)
        threads = torch.get_num_threads()
        self._lib.q4_1_dequantize(blocks.data_ptr(), n, groups * BLOCK, out.data_ptr(), threads)
        return out

    def scratch(self, elements: int) -> torch.Tensor:
        """A bf16 buffer of ``elements``, reused by this thread: expanding a layer's weights into memory
        already mapped (and likely cached) spares a page fault per 4 KiB on every call."""
        buffer = getattr(self._scratch, "buffer", None)
        if buffer is None or buffer.numel() < elements:
            buffer = self._scratch.buffer = torch.empty(elements, dtype=torch.bfloat16)
        return buffer[:elements]


def dequantize_reference(blocks: torch.Tensor) -> torch.Tensor:
    """What gguf-py's Q4_1 dequantizer gives, then rounded to bf16: ``[N, K]`` from ``[N, K/32, 20]``.
    Pure PyTorch (no kernel needed), for checking blocks against a model's weights."""
    n, groups = blocks.shape[0], blocks.shape[1]
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()
    m = blocks[..., 2:4].contiguous().view(torch.float16).float()
    nibbles = blocks[..., 4:]
    q = torch.cat([nibbles & 15, nibbles >> 4], dim=-1).float()
    return (d * q + m).to(torch.bfloat16).reshape(n, groups * BLOCK)


def fits(linear: torch.nn.Module) -> bool:
    """Whether ``linear`` has the shapes the kernel takes (no bias, ``N % 4 == 0``, ``K % 32 == 0``)."""
    return (
        isinstance(linear, torch.nn.Linear)
        and linear.bias is None
        and linear.out_features % 4 == 0
        and linear.in_features % BLOCK == 0
    )


class Q4_1Linear(torch.nn.Module):
    """Stands in for a bias-free ``nn.Linear`` ``[N, K]`` whose bf16 weights its Q4_1 ``blocks`` hold.

    Fewer than :data:`GEMM_ROWS` rows (decode) go through the kernel, which sums each output in fp32
    in its own order (within a few bf16 ulps of PyTorch's GEMM, whatever the batch); more rows go
    through PyTorch's GEMM on the expanded weights.
    """

    def __init__(self, blocks: torch.Tensor, kernels: Q4_1Kernels) -> None:
        super().__init__()
        self.register_buffer("blocks", blocks.contiguous())
        self.in_features, self.out_features = blocks.shape[1] * BLOCK, blocks.shape[0]
        self._kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] >= GEMM_ROWS or x.dtype != torch.bfloat16:
            scratch = self._kernels.scratch(self.out_features * self.in_features)
            weight = self._kernels.dequantize(self.blocks, scratch.view(self.out_features, self.in_features))
            return torch.nn.functional.linear(x, weight.to(x.dtype))
        return self._kernels.linear(rows.contiguous(), self.blocks).reshape(*x.shape[:-1], self.out_features)

    def expanded_weight(self) -> torch.Tensor:
        """The bf16 weights ``[N, K]``, expanded from the blocks."""
        return self._kernels.dequantize(self.blocks)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=Q4_1"
