"""Server processes under test: start, wait until they answer, sample peak RSS, stop."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil

LOG_DIR = Path(os.environ.get("BENCH_LOG_DIR", "/tmp/model-serving-bench"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RssSampler:
    """Peak resident memory of a process and its children, sampled in a background thread."""

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        self._process = psutil.Process(pid)
        self.baseline_bytes = self._process.memory_info().rss
        self.peak_bytes = self.baseline_bytes
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                procs = [self._process, *self._process.children(recursive=True)]
                self.peak_bytes = max(self.peak_bytes, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                return

    def stop(self) -> float:
        """Stop sampling; return how far the peak rose above the RSS at start, in MiB."""
        self._stop.set()
        self._thread.join()
        return (self.peak_bytes - self.baseline_bytes) / 2**20


@contextlib.contextmanager
def server(
    name: str, argv: list[str], ready: Callable[[str], bool], port: int, timeout_s: float = 300
) -> Iterator[tuple[str, RssSampler]]:
    """Run ``argv`` (which listens on ``port``); yield its base URL and RSS sampler once ``ready(url)``."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    base_url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(LOG_DIR / f"{name}.log", "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        sampler = RssSampler(process.pid)
        try:
            deadline = time.monotonic() + timeout_s
            while not _answers(ready, base_url):
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with {process.returncode}; see {log.name}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} not ready after {timeout_s}s; see {log.name}")
                time.sleep(0.2)
            yield base_url, sampler
        finally:
            sampler.stop()
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _answers(ready: Callable[[str], bool], base_url: str) -> bool:
    try:
        return ready(base_url)
    except (OSError, ValueError):  # refused, reset, 5xx (urllib.error.URLError is an OSError), bad JSON
        return False


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def our_server_argv(port: int, state_dir: Path, model: str, threads: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port),
        "--model", model, "--state-dir", str(state_dir), "--torch-threads", str(threads),
        "--log-level", "WARNING", *extra,
    ]  # fmt: skip


def our_server_ready(base_url: str) -> bool:
    return get_json(f"{base_url}/status").get("ready") is True


def transformers_serve_argv(port: int, model_dir: Path, continuous_batching: bool) -> list[str] | None:
    """``transformers serve`` pinned to the model, or None when ``transformers[serving]`` is missing."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        return None
    cli = Path(sys.executable).with_name("transformers")
    cb = "--continuous-batching" if continuous_batching else "--no-continuous-batching"
    return [
        str(cli),
        "serve",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        cb,
    ]


def health_ready(base_url: str) -> bool:
    """``GET /health`` answers 200 (``transformers serve``; ``llama-server`` once its model loaded)."""
    with urllib.request.urlopen(f"{base_url}/health", timeout=5) as response:
        return response.status == 200
