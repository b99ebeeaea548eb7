"""The CPU fast path: GGUF blocks served by the AVX-512 kernel in place of their bf16 expansion.

The kernel is compiled here with the machine's C compiler; on a CPU without AVX-512 the tests that
need it are skipped with the reason and the fallback test shows the model still serves.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from service.engine import SamplingParams
from service.handle import FastPath
from service.kernels.build import KernelUnavailableError
from service.kernels.gguf_blocks import (
    GEMM_ROWS,
    BlockEmbedding,
    BlockKernels,
    BlockLinear,
    dequantize_reference,
    packed,
)
from service.kernels.llama_decode import FusedDecoder
from service.lifecycle import fast_path, loader
from service.lifecycle.sources import ModelSource, SourceKind
from tests.server_process import running_server
from tests.test_engine import consume, run_alone
from tests.test_prefix_cache import engine_with
from tests.tiny_models import build_gguf_blocks_model, quantize_q4_1, quantize_q8_0

PROMPTS = [
    [{"role": "user", "content": "Hello! How can I help you today?"}],
    [{"role": "user", "content": "The capital of France is"}],
    [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Kubernetes"}],
    [{"role": "user", "content": "the quick brown fox jumps over the lazy dog 0123456789"}],
]


@pytest.fixture(scope="module")
def kernel_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kernel-cache")


@pytest.fixture(scope="module")
def kernels(kernel_cache: Path) -> BlockKernels:
    try:
        return BlockKernels(kernel_cache)
    except KernelUnavailableError as exc:
        pytest.skip(f"the block kernel cannot run here: {exc}")


@pytest.fixture(scope="module")
def blocks_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_gguf_blocks_model(tmp_path_factory.mktemp("models") / "tiny-gguf", seed=5)


QUANTIZERS = {"Q4_1": quantize_q4_1, "Q8_0": quantize_q8_0}
GREEDY_16 = SamplingParams(max_tokens=16, temperature=0.0)


def random_blocks(rows: int, columns: int, seed: int = 0, fmt: str = "Q4_1") -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return QUANTIZERS[fmt](torch.randn(rows, columns, generator=generator))


def load(model_dir: Path):
    source = ModelSource(str(model_dir), SourceKind.LOCAL)
    return loader.load(model_dir, source, device="cpu", dtype="bfloat16", on_progress=lambda *_: None)


def greedy(handle, new_tokens: int = 16) -> list[list[int]]:
    outputs = []
    with torch.inference_mode():
        for messages in PROMPTS:
            ids = torch.tensor([handle.encode_chat(messages)])
            out = handle.model.generate(
                ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
            )
            outputs.append(out[0, ids.shape[1] :].tolist())
    return outputs


def on_the_weights_map(handle, model_dir: Path) -> list[torch.Tensor]:
    """The model's parameters and buffers that lie in this process's memory map of its bf16 weights
    (Linux's ``/proc/self/maps``)."""
    weights = str(model_dir / "model.safetensors")
    spans = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == weights:
            spans.append(tuple(int(address, 16) for address in fields[0].split("-")))
    held = [*handle.model.parameters(), *handle.model.buffers()]
    return [t for t in held if any(start <= t.data_ptr() < end for start, end in spans)]


@pytest.mark.parametrize("fmt", QUANTIZERS)
def test_the_kernel_expands_blocks_to_exactly_the_reference_bf16_values(
    kernels: BlockKernels, fmt: str
) -> None:
    blocks = random_blocks(64, 256, fmt=fmt)
    assert torch.equal(kernels.dequantize(packed(blocks)), dequantize_reference(blocks))


@pytest.mark.parametrize("fmt", QUANTIZERS)
def test_the_reference_expansion_is_gguf_pys_dequantizer_rounded_to_bf16(fmt: str) -> None:
    from gguf import GGMLQuantizationType, quants

    blocks = random_blocks(8, 64, fmt=fmt)
    expected = quants.dequantize(blocks.numpy().reshape(8, -1), GGMLQuantizationType[fmt])
    expected_bf16 = torch.from_numpy(np.asarray(expected)).to(torch.bfloat16)
    assert torch.equal(dequantize_reference(blocks), expected_bf16)


@pytest.mark.parametrize("fmt", QUANTIZERS)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 13, 17, GEMM_ROWS + 1])
def test_a_block_layer_computes_what_the_bf16_layer_computes(
    kernels: BlockKernels, rows: int, fmt: str
) -> None:
    blocks = random_blocks(96, 128, seed=rows, fmt=fmt)
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    expected = torch.nn.functional.linear(x, dequantize_reference(blocks)).float()
    got = BlockLinear(blocks, kernels)(x).float()
    if rows >= GEMM_ROWS:  # prefill: PyTorch's GEMM on the expanded weights, so bit for bit
        assert torch.equal(got, expected)
    # The kernel sums exact products in fp32 and rounds to bf16 too; only the order of the sums differs.
    torch.testing.assert_close(got, expected, rtol=1.6e-2, atol=1e-2)


def test_a_rows_result_does_not_depend_on_the_batch_it_runs_in(kernels: BlockKernels) -> None:
    layer = BlockLinear(random_blocks(64, 96), kernels)
    x = torch.randn(GEMM_ROWS - 1, 96, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    batched = layer(x)
    for row in range(x.shape[0]):
        assert torch.equal(layer(x[row : row + 1]), batched[row : row + 1])


def test_a_built_kernel_loads_where_no_compiler_is(
    kernels: BlockKernels, kernel_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An image builds the kernel in its build stage; its runtime has the library and no compiler."""
    monkeypatch.setenv("CC", "false")
    blocks = random_blocks(8, 64)
    assert torch.equal(BlockKernels(kernel_cache).dequantize(packed(blocks)), dequantize_reference(blocks))


def test_the_fast_path_swaps_every_layer_and_greedy_tokens_match_the_bf16_model(
    kernels: BlockKernels, blocks_model: Path, tmp_path: Path
) -> None:
    handle = load(blocks_model)
    expected = greedy(handle)
    assert on_the_weights_map(handle, blocks_model)
    report, decoder = fast_path.install(handle.model, blocks_model, tmp_path)
    # q, k, v, o, gate, up, down in each of the 2 layers; the lm head (tied to the embedding).
    assert report == FastPath("gguf_blocks", {"Q4_1": 2 * 7, "Q8_0": 1}, fused_layers=2)
    assert isinstance(decoder, FusedDecoder)
    assert sum(isinstance(m, BlockLinear) for m in handle.model.modules()) == 15
    embedding = handle.model.get_input_embeddings()
    assert isinstance(embedding, BlockEmbedding) and embedding.blocks is handle.model.lm_head.blocks
    # serving_model_weights_bytes counts every block once, the head's shared with the embedding
    blocks = sum(m.blocks.nbytes for m in handle.model.modules() if isinstance(m, BlockLinear))
    assert blocks < loader.weight_bytes(handle) < blocks + handle.model.lm_head.blocks.nbytes
    assert greedy(handle) == expected
    assert not on_the_weights_map(handle, blocks_model)  # so the map closes


def test_a_model_whose_embedding_transformers_cannot_find_keeps_it_and_still_gets_the_block_layers(
    kernels: BlockKernels, blocks_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    handle = load(blocks_model)
    expected = greedy(handle)
    embedding = handle.model.model.embed_tokens

    def not_found() -> torch.nn.Module:
        raise NotImplementedError("`get_input_embeddings` not auto-handled")

    monkeypatch.setattr(handle.model, "get_input_embeddings", not_found)
    report, _ = fast_path.install(handle.model, blocks_model, tmp_path)
    assert report == FastPath("gguf_blocks", {"Q4_1": 2 * 7, "Q8_0": 1}, fused_layers=2)
    assert handle.model.model.embed_tokens is embedding  # the bf16 table, as loaded
    assert greedy(handle) == expected


def test_blocks_that_do_not_expand_to_a_layers_weights_leave_that_layer_alone(
    kernels: BlockKernels, blocks_model: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "model"
    copy.mkdir()
    for file in blocks_model.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    blocks = load_file(str(copy / fast_path.BLOCKS_FILE))
    blocks["model.layers.1.mlp.up_proj"][0, 0, 4] ^= 0x11  # two weights of one block change
    save_file(blocks, str(copy / fast_path.BLOCKS_FILE))
    handle = load(copy)
    report, decoder = fast_path.install(handle.model, copy, tmp_path)
    assert report.kernel == "gguf_blocks" and report.layers == {"Q4_1": 13, "Q8_0": 1}
    assert "model.layers.1.mlp.up_proj" in (report.reason or "")
    assert decoder is None and report.fused_layers == 0  # a layer is PyTorch's: no fused decode
    assert isinstance(handle.model.get_submodule("model.layers.1.mlp.up_proj"), torch.nn.Linear)


def test_without_blocks_a_compiler_or_bf16_the_model_serves_as_loaded(
    blocks_model: Path, tiny_model_a: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = load(tiny_model_a)
    report, _ = fast_path.install(plain.model, tiny_model_a, tmp_path)
    assert report.kernel is None and "no GGUF blocks" in (report.reason or "")

    monkeypatch.setenv("CC", "false")  # a compiler that fails, in a cache with no built kernel
    handle = load(blocks_model)
    report, _ = fast_path.install(handle.model, blocks_model, tmp_path / "empty-cache")
    assert report.kernel is None and "kernel unavailable" in (report.reason or "")
    assert not any(isinstance(m, BlockLinear) for m in handle.model.modules())

    handle.model.float()
    report, _ = fast_path.install(handle.model, blocks_model, tmp_path)
    assert report.kernel is None and "float32" in (report.reason or "")


def test_gguf_blocks_are_matched_to_layers_through_llamas_q_and_k_row_order(
    kernels: BlockKernels, blocks_model: Path, tmp_path: Path
) -> None:
    """llama.cpp's converter permutes q and k rows for its rotary layout; ``write_blocks`` undoes it."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from safetensors.torch import load_file

    handle = load(blocks_model)
    config = handle.model.config
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "mlp.down_proj": "ffn_down"}
    expected = load_file(str(blocks_model / fast_path.BLOCKS_FILE))
    writer = GGUFWriter(str(tmp_path / "tiny.gguf"), "llama")
    for name, blocks in expected.items():
        layer, _, module = name.removeprefix("model.layers.").partition(".")
        if name == "lm_head":
            gguf_name, fmt, stored = "token_embd.weight", GGMLQuantizationType.Q8_0, blocks
        elif module in names:
            kind = names[module]
            stored = _permute(blocks, heads[kind]) if kind in heads else blocks
            gguf_name, fmt = f"blk.{layer}.{kind}.weight", GGMLQuantizationType.Q4_1
        else:
            continue
        rows = stored.reshape(stored.shape[0], -1)
        writer.add_tensor(gguf_name, rows.numpy(), raw_shape=tuple(rows.shape), raw_dtype=fmt)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    written = fast_path.write_blocks(tmp_path / "tiny.gguf", handle.model, tmp_path / "blocks.safetensors")
    assert written == 2 * len(names) + 1
    for name, blocks in load_file(str(tmp_path / "blocks.safetensors")).items():
        assert torch.equal(blocks, expected[name])


def _permute(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's ``convert_hf_to_gguf`` ``permute`` of q/k rows (the inverse of transformers' own)."""
    n = rows.shape[0]
    return rows.reshape(heads, 2, n // heads // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def test_get_model_says_which_kernel_serves_and_why_not(blocks_model: Path, tmp_path: Path) -> None:
    with running_server(tmp_path / "on", model=str(blocks_model)) as server:
        info = httpx.get(f"{server.base_url}/model").json()
        reply = httpx.post(
            f"{server.base_url}/completion", json={"messages": PROMPTS[0], "max_tokens": 4}, timeout=60
        )
    assert reply.status_code == 200, reply.text
    if info["fast_path"]["kernel"] is None:
        assert "kernel unavailable" in info["fast_path"]["reason"]
    else:
        assert info["fast_path"] == {
            "kernel": "gguf_blocks",
            "layers": {"Q4_1": 14, "Q8_0": 1},
            "reason": None,
            "fused_layers": 2,
        }
    off = {"SERVING_FAST_PATH": "false"}
    with running_server(tmp_path / "off", model=str(blocks_model), env=off) as server:
        info = httpx.get(f"{server.base_url}/model").json()
    reason = "turned off (SERVING_FAST_PATH=false)"
    assert info["fast_path"] == {"kernel": None, "layers": {}, "reason": reason, "fused_layers": 0}


def _left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def test_a_fused_decode_step_computes_what_the_models_forward_computes(
    kernels: BlockKernels, blocks_model: Path, tmp_path: Path
) -> None:
    """Three rows of different lengths (left padding), ten steps, teacher-forced: the same logits within
    bf16 rounding, the same greedy picks, the same KV cache. Every third step runs the model's forward on
    the fused step's cache, as the batch does when it outgrows the fused step."""
    from transformers import DynamicCache

    handle = load(blocks_model)
    _, decoder = fast_path.install(handle.model, blocks_model, tmp_path)
    model = handle.model
    ids, mask = _left_padded([handle.encode_chat(m) for m in PROMPTS[:3]])
    assert len(set(mask.sum(-1).tolist())) == 3
    caches = [DynamicCache(config=model.config), DynamicCache(config=model.config)]
    with torch.inference_mode():
        for cache in caches:
            out = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), cache=cache)
        tokens = out.logits[:, -1].argmax(-1, keepdim=True)
        for step in range(10):
            mask = torch.nn.functional.pad(mask, (0, 1), value=1)
            inputs = {"input_ids": tokens, "attention_mask": mask, "position_ids": _positions(mask)[:, -1:]}
            expected = model(**inputs, cache=caches[0]).logits[:, -1].float()
            if step % 3 == 2:
                got = model(**inputs, cache=caches[1]).logits[:, -1].float()
            else:
                got = decoder(tokens, mask, inputs["position_ids"], caches[1]).float()
            scale = float(expected.abs().max())
            assert float((got - expected).abs().max()) <= 0.02 * scale
            assert torch.equal(got.argmax(-1), expected.argmax(-1))
            tokens = expected.argmax(-1, keepdim=True)
    for eager, fused in zip(caches[0].layers, caches[1].layers, strict=True):
        assert (
            fused.keys.shape == eager.keys.shape == (3, model.config.num_key_value_heads, mask.shape[1], 16)
        )
        torch.testing.assert_close(fused.keys, eager.keys, rtol=0.05, atol=0.05)
        torch.testing.assert_close(fused.values, eager.values, rtol=0.05, atol=0.05)


@pytest.fixture
def fused_handle(kernels: BlockKernels, blocks_model: Path, tmp_path: Path):
    handle = load(blocks_model)
    _, decoder = fast_path.install(handle.model, blocks_model, tmp_path)
    return dataclasses.replace(handle, decode_step=decoder)


async def test_the_engine_decodes_through_the_fused_layers_whatever_the_batch(
    fused_handle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request alone, and in a batch that others join one at a time (spliced and trimmed cache), gets
    the same tokens through the fused step: each row's arithmetic does not depend on the rows beside it.
    (Each joins after the previous one's first token, so every prompt is prefilled alone both ways:
    PyTorch's GEMM, which prefill uses, may sum differently for another number of rows.)"""
    steps = []
    call = FusedDecoder.__call__
    monkeypatch.setattr(FusedDecoder, "__call__", lambda self, *args: steps.append(1) or call(self, *args))
    prompts = [fused_handle.encode_chat(m) for m in PROMPTS]
    async with engine_with(0) as (engine, _):
        await run_alone(engine, dataclasses.replace(fused_handle, decode_step=None), prompts[0], GREEDY_16)
        assert not steps  # a handle without the step decodes through the model's forward
        alone = [(await run_alone(engine, fused_handle, p, GREEDY_16)).token_ids for p in prompts]
        assert len(steps) >= len(prompts) * (GREEDY_16.max_tokens - 1) // 2
        running = []
        for prompt in prompts:
            stream = engine.submit(fused_handle, prompt, GREEDY_16)
            running.append(consume(stream, await anext(aiter(stream))))
        runs = await asyncio.gather(*running)
        assert [r.token_ids for r in runs] == alone


async def test_a_prompt_one_token_past_a_cached_sequence_runs_that_token_as_a_fused_step(
    fused_handle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finished request leaves its prompt and completion in the prefix cache. A prompt that is that
    prompt and the first generated token has only that token left to run: one fused step, and then it
    continues exactly as the first request did (the fused step computes a row the same in any batch)."""
    steps = []
    call = FusedDecoder.__call__
    monkeypatch.setattr(FusedDecoder, "__call__", lambda self, *args: steps.append(1) or call(self, *args))
    prompt = fused_handle.encode_chat(PROMPTS[0])
    async with engine_with(2**24) as (engine, _):
        first = await run_alone(engine, fused_handle, prompt, GREEDY_16)
        assert len(first.token_ids) == GREEDY_16.max_tokens
        steps.clear()
        again = await run_alone(engine, fused_handle, prompt, GREEDY_16)
        assert again.result.usage.cached_tokens == len(prompt)  # whole, with its logits: no forward
        assert again.token_ids == first.token_ids and len(steps) == GREEDY_16.max_tokens - 1
        steps.clear()
        further = await run_alone(engine, fused_handle, [*prompt, first.token_ids[0]], GREEDY_16)
    assert further.result.usage.cached_tokens == len(prompt)
    assert len(steps) == 1 + GREEDY_16.max_tokens - 1
    assert further.token_ids[:-1] == first.token_ids[1:]


async def test_a_failing_fused_step_ends_its_requests_and_the_next_ones_decode(
    fused_handle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel's one error (its buffers cannot be allocated) mid-generation: the running request ends
    in error, counted as a decode failure; the engine serves the next one with the same tokens."""
    from service.engine import FinishReason
    from service.metrics import ENGINE_STEP_FAILURES_TOTAL

    prompt = fused_handle.encode_chat(PROMPTS[0])
    armed = [False]
    call = FusedDecoder.__call__

    def flaky(self: FusedDecoder, *args: Any) -> Any:
        if armed[0]:
            armed[0] = False
            raise MemoryError("the fused decode layer could not allocate its buffers")
        return call(self, *args)

    monkeypatch.setattr(FusedDecoder, "__call__", flaky)
    async with engine_with(0) as (engine, metrics):
        before = await run_alone(engine, fused_handle, prompt, GREEDY_16)
        stream = engine.submit(fused_handle, prompt, GREEDY_16)
        first = await anext(aiter(stream))
        armed[0] = True
        failed = await consume(stream, first)
        assert not armed[0]
        assert failed.result.finish_reason is FinishReason.ERROR
        labels = {"stage": "decode"}
        assert metrics.registry.get_sample_value(ENGINE_STEP_FAILURES_TOTAL, labels) == 1
        after = await run_alone(engine, fused_handle, prompt, GREEDY_16)
        assert after.token_ids == before.token_ids and engine.failure is None


def test_fused_decode_layers_need_every_projection_on_the_block_kernel(tiny_model_a: Path) -> None:
    from service.kernels.llama_decode import unfit_reason

    assert unfit_reason(load(tiny_model_a).model) == "layer 0 has projections the block kernel does not serve"
