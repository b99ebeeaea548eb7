"""Where a served model's memory goes: RSS after each step of deploying the bundled model, in a fresh process.

``python -m benchmarks.memory`` (part of ``make bench``). A child interpreter, with one malloc arena as
the server runs (``service.cli``), takes the server's steps: ``import torch``, the server's own imports,
transformers' modeling code for the model, loading, installing the CPU fast path, warm-up. Each row is
the RSS after its step (``/proc/self/statm``, so Linux only), what it added, and the packages that
brought most of the modules it imported. The peak under load is in ``serving.md``. Writes
benchmarks/results/memory.{json,md}.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import bundled_model_dir, parser_for, write_results


def _rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _package(module: str) -> str:
    """``torch._dynamo.utils`` -> ``torch._dynamo``; ``sympy.core`` -> ``sympy``."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] in ("torch", "transformers") and len(parts) > 1 else parts[0]


def _steps(model_dir: Path, threads: int) -> list[dict[str, Any]]:
    """Run in the child: each deployment step, then its RSS and the modules it imported."""
    rows: list[dict[str, Any]] = []
    seen = set(sys.modules)

    def record(step: str) -> None:
        nonlocal seen
        added = set(sys.modules) - seen
        seen |= added
        top = collections.Counter(_package(m) for m in added).most_common(4)
        rows.append({"step": step, "rss_mib": _rss_mib(), "modules": len(added), "packages": top})

    record("Python")
    import torch

    torch.set_num_threads(threads)
    record("import torch")
    import service.app  # noqa: F401  (the server's own imports)

    record("the server's imports")
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(model_dir).model_type
    importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    record("transformers' modeling code for the model")
    from service.lifecycle import fast_path, loader
    from service.lifecycle.sources import ModelSource, SourceKind
    from service.settings import Settings

    source = ModelSource(str(model_dir), SourceKind.LOCAL)
    handle = loader.load(model_dir, source, device="cpu", dtype="bfloat16", on_progress=lambda *_: None)
    record("loading: tokenizer, modules, the weights' memory map")
    report, handle.decode_step = fast_path.install(handle.model, model_dir, Settings().cache_dir)
    record(f"installing the CPU fast path ({report.kernel or report.reason})")
    loader.warm_up(handle)
    record("warm-up: ready")
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| step | RSS (MiB) | added (MiB) | modules imported | most of them from |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    previous = 0.0
    for row in rows:
        rss = row["rss_mib"]
        packages = ", ".join(f"{name} {count}" for name, count in row["packages"])
        lines.append(f"| {row['step']} | {rss:.0f} | {rss - previous:+.0f} | {row['modules']} | {packages} |")
        previous = rss
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = parser_for(__doc__)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # the model folder, in the child
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_steps(args.child, args.threads)))
        return

    model_dir = bundled_model_dir()  # converted here, not in the process measured
    child = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.memory",
            "--threads",
            str(args.threads),
            "--child",
            str(model_dir),
        ],
        env={**os.environ, "MALLOC_ARENA_MAX": "1"},  # as service.cli sets it for the server
        capture_output=True,
        text=True,
        check=True,
    )
    rows = json.loads(child.stdout.splitlines()[-1])
    write_results(args.out, "memory", rows, markdown(rows))


if __name__ == "__main__":
    main()
