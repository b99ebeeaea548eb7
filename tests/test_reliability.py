"""The bad day, against real server processes: SIGTERM mid-stream, bursts far over capacity,
clients that vanish, deployments interrupted by shutdown. Figures are printed (-s) for the README."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from service.lifecycle.state import STATE_FILE
from tests.server_process import ServerProcess, running_server

LONG = {"messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 1000, "temperature": 0}
SHORT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0}


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    """Current value of one sample on the server's /metrics."""
    text = httpx.get(f"{server.base_url}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise KeyError(name)


def wait_until(predicate, timeout_s: float = 30, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise TimeoutError(what)


class OpenStream:
    """A streamed /completion whose first event has arrived; the rest is read on demand."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.lines = response.aiter_lines()  # kept: dropping it would close the connection
        self.events: list[str] = []

    @classmethod
    async def open(cls, client: httpx.AsyncClient, body: dict) -> OpenStream:
        request = client.build_request("POST", "/completion", json={**body, "stream": True})
        stream = cls(await client.send(request, stream=True))
        async for line in stream.lines:
            if line.startswith("data: "):
                stream.events.append(line)
                break
        return stream

    async def read_to_end(self) -> dict:
        async for line in self.lines:
            if line.startswith("data: "):
                self.events.append(line)
        return json.loads(self.events[-1][6:])


def test_sigterm_drains_in_flight_streams_then_exits_zero(tmp_path: Path, tiny_model_a: Path) -> None:
    async def scenario(server: ServerProcess) -> dict[str, float]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
            # Eight long streams keep the batch busy for seconds, well past the checks below.
            streams = await asyncio.gather(*(OpenStream.open(client, LONG) for _ in range(8)))
            sigterm_at = time.monotonic()
            server.process.send_signal(15)
            await asyncio.sleep(0.05)
            readyz = await client.get("/readyz")
            assert readyz.status_code == 503 and readyz.json()["error"]["type"] == "shutting_down"
            refused = await client.post("/completion", json=SHORT)
            assert refused.status_code == 503 and refused.headers["Retry-After"].isdigit()
            assert refused.json()["error"]["type"] == "shutting_down"
            for stream in streams:  # each in-flight stream runs to its natural end
                final = await stream.read_to_end()
                assert final["finish_reason"] in ("length", "stop"), final
        return {"drain_s": time.monotonic() - sigterm_at}

    with running_server(tmp_path, model=str(tiny_model_a), args=("--shutdown-grace-s", "60")) as server:
        figures = asyncio.run(scenario(server))
        assert server.process.wait(60) == 0
        logs = server.logs()
        assert '"msg": "drained"' in logs and '"msg": "stopped"' in logs
        print(
            f"\n[figure] SIGTERM with 8 streams in flight: drained and exited 0 in {figures['drain_s']:.2f}s"
        )


def test_burst_over_capacity_sheds_load_with_429(tmp_path: Path, tiny_model_a: Path) -> None:
    args = ("--max-running-requests", "2", "--max-queued-requests", "2")
    with running_server(tmp_path, model=str(tiny_model_a), args=args) as server:
        for _ in range(3):  # warm caches so the baseline is steady
            httpx.post(f"{server.base_url}/completion", json=SHORT, timeout=60)
        baseline = metric(server, "process_resident_memory_bytes")

        async def burst(n: int) -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=n)
            async with httpx.AsyncClient(base_url=server.base_url, timeout=60, limits=limits) as client:
                body = {**SHORT, "max_tokens": 64}
                return await asyncio.gather(*(client.post("/completion", json=body) for _ in range(n)))

        responses = asyncio.run(burst(40))
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429}, codes
        assert codes.count(200) >= 4 and codes.count(429) >= 1, codes
        for r in responses:
            if r.status_code == 429:
                assert int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["type"] == "overloaded"
        assert metric(server, "serving_requests_rejected_total", reason="queue_full") == codes.count(429)
        assert metric(server, "serving_num_requests_waiting") == 0
        wait_until(lambda: metric(server, "serving_num_requests_running") == 0, what="batch empty")
        after = metric(server, "process_resident_memory_bytes")
        print(
            f"\n[figure] burst of 40 over 2 running + 2 queued: {codes.count(200)} x 200,"
            f" {codes.count(429)} x 429, 0 x 5xx;"
            f" RSS {baseline / 2**20:.0f} MiB before, {after / 2**20:.0f} MiB after"
        )
        assert after < baseline + 64 * 2**20  # no growth that stays after the burst


def test_disconnected_clients_free_their_slots(tmp_path: Path, tiny_model_a: Path) -> None:
    args = ("--max-running-requests", "1", "--max-queued-requests", "0")
    with running_server(tmp_path, model=str(tiny_model_a), args=args) as server:

        async def disconnect_mid_stream() -> None:
            async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
                stream = await OpenStream.open(client, LONG)
                assert stream.events
                await stream.response.aclose()  # the client goes away mid-stream

        asyncio.run(disconnect_mid_stream())
        wait_until(lambda: metric(server, "serving_num_requests_running") == 0, what="slot freed")
        assert metric(server, "serving_requests_cancelled_total", reason="client_disconnected") == 1

        # A non-streaming client that hangs up: a raw socket that sends the request and closes.
        body = json.dumps(LONG).encode()
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(
                b"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            wait_until(lambda: metric(server, "serving_num_requests_running") == 1, what="request running")
        wait_until(lambda: metric(server, "serving_num_requests_running") == 0, what="slot freed")
        assert metric(server, "serving_requests_cancelled_total", reason="client_disconnected") == 2
        # Capacity is back: with one slot and no queue, a new request is served, not refused.
        assert httpx.post(f"{server.base_url}/completion", json=SHORT, timeout=60).status_code == 200


def test_shutdown_during_deployment_keeps_the_old_model(
    tmp_path: Path, tiny_model_a: Path, tiny_model_b: Path
) -> None:
    args = ("--model-root", str(tiny_model_b.parent))
    with running_server(tmp_path, model=str(tiny_model_a), args=args) as server:
        response = httpx.post(f"{server.base_url}/model", json={"model_id": "tiny-b"})
        assert response.status_code == 202
        assert server.terminate() == 0
    state_dir = tmp_path / "state"
    assert [p.name for p in state_dir.iterdir()] == [STATE_FILE]  # no temp file left behind
    assert json.loads((state_dir / STATE_FILE).read_text())["model_id"] == str(tiny_model_a)
    with running_server(tmp_path, model=str(tiny_model_b), args=args) as server:
        assert httpx.get(f"{server.base_url}/model").json()["model_id"] == str(tiny_model_a)
        response = httpx.post(f"{server.base_url}/model", json={"model_id": "tiny-b"})
        assert response.status_code == 202  # the next deployment works
