"""How long a model swap takes: ``POST /model`` to ``GET /status`` reporting phase ``ready``.

``python -m benchmarks.deploy_latency``. The server starts on a local copy of the bundled model,
then alternates: deploy the bundled model (already converted in the cache: the figure asked
for), deploy the local copy back (so the next bundled deployment is a real one again).
Writes benchmarks/results/deploy_latency.{json,md}.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks import servers
from benchmarks.common import (
    bundled_model_dir,
    parser_for,
    percentile,
    write_results,
)

BUNDLED = "bundled:smollm2-135m-instruct"


def deploy(base_url: str, model_id: str, timeout_s: float = 300) -> float:
    """Seconds from POST /model to its deployment reaching phase ``ready``."""
    request = urllib.request.Request(
        f"{base_url}/model",
        data=json.dumps({"model_id": model_id}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=30) as response:
        deployment_id = json.load(response)["id"]
    while time.perf_counter() - start < timeout_s:
        current = servers.get_json(f"{base_url}/status").get("deployment") or {}
        if current.get("id") == deployment_id and current.get("phase") in ("ready", "failed"):
            if current["phase"] == "failed":
                raise RuntimeError(f"deployment of {model_id} failed: {current.get('error')}")
            return time.perf_counter() - start
        time.sleep(0.02)
    raise TimeoutError(f"deployment of {model_id} not ready after {timeout_s}s")


def main(argv: list[str] | None = None) -> None:
    parser = parser_for(__doc__)
    parser.add_argument("--repetitions", type=int, default=5)
    args = parser.parse_args(argv)

    bundled_dir = bundled_model_dir()
    bundled_s: list[float] = []
    local_s: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "models"
        local = shutil.copytree(bundled_dir, root / "smollm2-local")
        port = servers.free_port()
        argv_ours = servers.our_server_argv(
            port, Path(tmp) / "state", str(local), args.threads, "--model-root", str(root)
        )
        with servers.server("deploy", argv_ours, servers.our_server_ready, port) as (url, _):
            for i in range(args.repetitions):
                bundled_s.append(deploy(url, BUNDLED))
                local_s.append(deploy(url, str(local)))
                print(f"  {i + 1}: bundled {bundled_s[-1]:.2f}s, local copy {local_s[-1]:.2f}s", flush=True)

    summary = {
        name: {"p50_s": percentile(values, 50), "p95_s": percentile(values, 95), "runs_s": values}
        for name, values in (("bundled", bundled_s), ("local_copy", local_s))
    }
    lines = ["| deployed model | runs | p50 (s) | p95 (s) |", "| --- | ---: | ---: | ---: |"]
    lines += [
        f"| {n} | {len(s['runs_s'])} | {s['p50_s']:.2f} | {s['p95_s']:.2f} |" for n, s in summary.items()
    ]
    write_results(args.out, "deploy_latency", summary, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
