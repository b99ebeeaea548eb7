"""What every benchmark shares: the workload, the bundled model, percentiles and the result row."""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The fixed workload of the issue: one chat prompt, 64 new tokens, greedy.
MESSAGES = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
NEW_TOKENS = 64
RESULTS_DIR = Path(__file__).parent / "results"


def bundled_model_dir() -> Path:
    """The bundled model as bf16 safetensors (converted once, in the cache the server uses too)."""
    from service.lifecycle.bundled import ensure_converted
    from service.settings import Settings

    return ensure_converted(Settings().cache_dir)


def num_threads() -> int:
    """Torch threads for in-process runs: what a server process on this machine gets."""
    return int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1))


def parser_for(doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's command line: ``doc`` (its module docstring) as help, and the options every
    benchmark takes, ``--threads`` and ``--out`` (the results folder)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=num_threads())
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    return parser


def write_results(out: Path, name: str, data: Any, table: str) -> None:
    """Write ``out/<name>.json`` (``data``) and ``out/<name>.md`` (``table``), and print the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2))
    (out / f"{name}.md").write_text(table)
    print(table)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (NaN for no values)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


@dataclass
class Row:
    """One line of a benchmark table."""

    system: str
    concurrency: int
    tok_s: float
    ttft_p50_s: float
    ttft_p95_s: float
    e2e_p95_s: float
    errors: int
    peak_rss_mb: float
    requests: int = 0
    # "repeated": every request sends the fixed prompt (servers with a prefix cache reuse it);
    # "distinct": each its own (a cold prefill everywhere).
    prompts: str = "repeated"
