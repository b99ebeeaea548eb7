"""Builders of tiny but real chat models for the tests: a 2-layer Llama and a byte-level BPE
tokenizer trained on the spot, with a ChatML chat template. Built in a second, fully offline."""

from __future__ import annotations

import shutil
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

#: A Hermes-style ChatML template that renders tools, tool calls and tool results the way the Qwen
#: and SmolLM families do (tools in the system turn, calls in <tool_call> tags).
HERMES_TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{%- if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
    "# Tools\n\nYou may call one or more functions. Their signatures are within <tools></tools>:\n<tools>"
    "{%- for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools>\n\n"
    "For each call, return a JSON object with the function name and arguments within "
    "<tool_call></tool_call>:\n"
    '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if tools and loop.first and message['role'] == 'system' %}"
    "{%- elif message['role'] == 'assistant' and message.get('tool_calls') %}<|im_start|>assistant\n"
    "{%- if message['content'] %}{{ message['content'] }}\n{% endif %}"
    "{%- for call in message['tool_calls'] %}<tool_call>\n"
    '{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}'
    "\n</tool_call>{% endfor %}<|im_end|>\n"
    "{%- elif message['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message['content'] }}"
    "\n</tool_response><|im_end|>\n"
    "{%- else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Hello! How can I help you today? I am a helpful assistant.",
    "Kubernetes runs containers; Prometheus scrapes metrics; Grafana draws dashboards.",
    "system user assistant: the quick brown fox jumps over the lazy dog 0123456789",
] * 20


def build_tokenizer(out_dir: Path, chat_template: str = CHATML_TEMPLATE):
    """Train a ~400-token byte-level BPE tokenizer and save it with ``chat_template``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = chat_template
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_model(out_dir: Path, *, seed: int, chat_template: str = CHATML_TEMPLATE) -> Path:
    """Save a 2-layer Llama (random weights from ``seed``) plus tokenizer (with ``chat_template``)
    to ``out_dir``."""
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir, chat_template)
    torch.manual_seed(seed)
    model = _llama(
        tokenizer,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def _llama(tokenizer, **shape):
    """A float32 Llama of ``shape`` (LlamaConfig fields) with ``tokenizer``'s vocabulary and special ids."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_scripted_model(out_dir: Path, *, first_reply_token: str, then: str) -> Path:
    """A model whose greedy (and, by a wide margin, sampled) reply is fixed: ``first_reply_token``
    (added to the vocabulary as one plain token), then ``then`` (one token of the vocabulary) forever,
    never an end-of-sequence token.

    A 1-layer Llama turned into a bigram table: one-hot embeddings, attention and MLP outputs zeroed
    (the residual stream is the current token's embedding), and an untied LM head whose rows say
    which token follows which. Real weights, tokenizer and chat template, served like any model.
    """
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir)
    tokenizer.add_tokens([first_reply_token])
    tokenizer.save_pretrained(out_dir)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    prompt_end = (ids["input_ids"] if hasattr(ids, "keys") else ids)[-1]
    first, repeated = tokenizer.convert_tokens_to_ids([first_reply_token, then])
    hidden = 512
    assert len(tokenizer) <= hidden, "one-hot embeddings need a vocabulary no larger than hidden_size"
    model = _llama(
        tokenizer,
        hidden_size=hidden,
        intermediate_size=32,
        num_hidden_layers=1,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
    )
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(len(tokenizer), hidden))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        head = torch.zeros(len(tokenizer), hidden)
        head[first, prompt_end] = head[repeated, first] = head[repeated, repeated] = 5.0
        model.lm_head.weight.copy_(head)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def install_in_hub_cache(model_dir: Path, hf_home: Path, repo_id: str, revision: str = "0" * 40) -> Path:
    """Lay ``model_dir`` out as ``$HF_HOME/hub/models--ORG--NAME`` so ``repo_id`` resolves offline."""
    repo_dir = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        shutil.copy2(f, snapshot / f.name)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return snapshot


def quantize_q4_1(weight):
    """llama.cpp's ``quantize_row_q4_1`` in PyTorch: ``[N, K]`` float weights -> Q4_1 blocks
    ``[N, K/32, 20]`` uint8 (per 32 weights: fp16 scale ``(max - min) / 15``, fp16 ``min``, 16 bytes of
    nibbles, weights 0-15 low and 16-31 high)."""
    import torch

    groups = weight.float().reshape(weight.shape[0], -1, 32)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    d = ((high - low) / 15).half()
    m = low.half()
    q = torch.where(d.float() > 0, (groups - m.float()) / d.float(), 0).round().clamp(0, 15).to(torch.uint8)
    nibbles = q[..., :16] | (q[..., 16:] << 4)
    return torch.cat([d.view(torch.uint8), m.view(torch.uint8), nibbles], dim=-1)


def quantize_q8_0(weight):
    """llama.cpp's ``quantize_row_q8_0`` in PyTorch: ``[N, K]`` -> Q8_0 blocks ``[N, K/32, 34]`` uint8
    (per 32 weights: fp16 scale ``max|w| / 127``, then 32 int8)."""
    import torch

    groups = weight.float().reshape(weight.shape[0], -1, 32)
    d = (groups.abs().amax(-1, keepdim=True) / 127).half()
    q = torch.where(d.float() > 0, groups / d.float(), 0).round().clamp(-127, 127).to(torch.int8)
    return torch.cat([d.view(torch.uint8), q.view(torch.uint8)], dim=-1)


def build_gguf_blocks_model(out_dir: Path, *, seed: int) -> Path:
    """A tiny Llama as a GGUF's conversion leaves it: every decoder linear layer's weights are the
    bf16 expansion of Q4_1 blocks, the tied embedding / lm head's of Q8_0 blocks, and the blocks lie
    beside them in ``gguf_blocks.safetensors`` (the fast path's input), as the bundled model's do."""
    import torch
    from safetensors.torch import save_file

    from service.kernels.gguf_blocks import dequantize_reference
    from service.lifecycle.fast_path import BLOCKS_FILE

    build_tiny_model(out_dir, seed=seed)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.bfloat16)
    blocks = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                # Wider than the random init, as trained weights are: peaked logits, stable greedy picks.
                quantize = quantize_q8_0 if name == "lm_head" else quantize_q4_1
                blocks[name] = quantize(module.weight.float() * 8)
                module.weight.copy_(dequantize_reference(blocks[name]))
    model.save_pretrained(out_dir, safe_serialization=True)
    save_file(blocks, str(out_dir / BLOCKS_FILE))
    return out_dir
