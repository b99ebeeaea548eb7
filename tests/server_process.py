"""Start and stop a real server process (``python -m service``) on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Wait until /readyz answers 200 (a model is serving)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.logs()[-4000:]}")
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout_s}s:\n{self.logs()[-4000:]}")

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, then wait for the exit code (SIGKILL only if it hangs past ``timeout_s``)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


@contextmanager
def running_server(
    workdir: Path,
    *,
    model: str,
    args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    ready: bool = True,
    ready_timeout_s: float = 120.0,
) -> Iterator[ServerProcess]:
    """A server process serving ``model``, state in ``workdir``; stopped (SIGTERM) on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = workdir / f"server-{port}.log"
    full_env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "SERVING_TORCH_THREADS": "1",
        **(env or {}),
    }
    command = [
        sys.executable,
        "-m",
        "service",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--model",
        model,
        "--state-dir",
        str(workdir / "state"),
        *args,
    ]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=full_env, stdout=log_file, stderr=subprocess.STDOUT
        )
    server = ServerProcess(process, port, log_path)
    try:
        if ready:
            server.wait_ready(ready_timeout_s)
        yield server
    finally:
        if process.poll() is None:
            server.terminate()
