"""``GET /status/events``: the deployment event stream, in-process and against a real server process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient

from service.lifecycle.events import LISTENER_BUFFER, EventHub, EventType
from service.metrics import MODEL_DOWNLOAD_BYTES_TOTAL
from tests.hub_double import serving_repo
from tests.server_process import running_server
from tests.test_api import ADMIN, CHAT, broken_copy, deploy, start, wait_for_phase

LIFECYCLE_TYPES = {"phase", "progress", "outcome"}


@dataclass(frozen=True)
class Sse:
    type: str
    data: Any
    id: int | None


async def sse_events(lines: AsyncIterator[str]) -> AsyncIterator[Sse]:
    """Parse Server-Sent Events from decoded lines (without their line ends)."""
    fields: dict[str, str] = {}
    async for line in lines:
        if line:
            name, _, value = line.partition(": ")
            fields[name] = value
            continue
        if fields:
            yield Sse(
                fields["event"], json.loads(fields["data"]), int(fields["id"]) if "id" in fields else None
            )
            fields = {}


async def _aiohttp_lines(response: ClientResponse) -> AsyncIterator[str]:
    async for raw in response.content:
        yield raw.decode().rstrip("\r\n")


async def _open(client: TestClient, last_event_id: int | None = None) -> AsyncIterator[Sse]:
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    response = await client.get("/status/events", headers=headers)
    assert response.status == 200 and response.content_type == "text/event-stream"
    return sse_events(_aiohttp_lines(response))


async def _until_outcome(events: AsyncIterator[Sse], deployment_id: str) -> list[Sse]:
    """Lifecycle events of ``deployment_id`` up to and including its outcome."""
    seen = []
    async with asyncio.timeout(120):
        async for event in events:
            if event.type in LIFECYCLE_TYPES and deployment_id in (
                event.data.get("id"),
                event.data.get("deployment_id"),
            ):
                seen.append(event)
                if event.type == "outcome":
                    return seen
    raise AssertionError(f"stream ended before the outcome: {seen}")


@pytest.fixture
async def client(
    aiohttp_client: Any, tmp_path: Path, tiny_model_a: Path, tiny_model_b: Path, models_root: Path
) -> TestClient:
    return await start(
        aiohttp_client,
        tmp_path,
        tiny_model_a,
        model_root=models_root,
        admin_token="s3cret",
        events_heartbeat_s=0.3,
    )


async def test_listener_sees_every_phase_in_order_with_progress_and_outcome(client: TestClient) -> None:
    events = await _open(client)
    snapshot = await anext(events)
    assert snapshot.type == "snapshot" and snapshot.id is None
    assert snapshot.data == await (await client.get("/status")).json()

    status, body = await deploy(client, "tiny-b")
    assert status == 202
    seen = await _until_outcome(events, body["id"])
    final = (await (await client.get("/status")).json())["deployment"]

    ids = [e.id for e in seen]
    assert all(i is not None for i in ids) and ids == sorted(set(ids)), ids
    phases = [e.data["phase"] for e in seen if e.type == "phase"]
    assert phases == ["pending", "resolving", "loading", "warming", "ready"]
    # Load progress arrives between the loading and warming phase events, counting up to all tensors.
    types = [e.type if e.type != "phase" else e.data["phase"] for e in seen]
    progress = [e.data for e in seen if e.type == "progress"]
    assert progress and types.index("loading") < types.index("progress") < types.index("warming"), types
    assert {(p["stage"], p["unit"]) for p in progress} == {("load", "tensors")}
    done = [p["done"] for p in progress]
    assert done == sorted(done) and done[-1] == progress[-1]["total"] > 0, progress
    # The last phase event and the outcome are the deployment exactly as GET /status shows it.
    assert seen[-1].type == "outcome" and seen[-2].type == "phase"
    assert seen[-1].data == seen[-2].data == final


async def test_failed_deployment_outcome_carries_the_reason(
    client: TestClient, tiny_model_b: Path, models_root: Path
) -> None:
    corrupt = broken_copy(tiny_model_b, models_root, "corrupt-for-events")
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}garbage")
    events = await _open(client)
    status, body = await deploy(client, "corrupt-for-events")
    assert status == 202
    seen = await _until_outcome(events, body["id"])
    outcome = seen[-1].data
    assert outcome["phase"] == "failed" and "safetensors" in outcome["error"], outcome
    assert outcome == (await wait_for_phase(client, body["id"]))["deployment"]


async def test_last_event_id_replays_only_what_was_missed(client: TestClient) -> None:
    _, body = await deploy(client, "tiny-b")
    everything = await _until_outcome(await _open(client, last_event_id=0), body["id"])
    # A listener that saw up to the second phase event resumes from there.
    resume_after = [e for e in everything if e.type == "phase"][1].id
    assert resume_after is not None
    events = await _open(client, last_event_id=resume_after)
    assert (await anext(events)).type == "snapshot"
    replayed = []
    async with asyncio.timeout(30):
        async for event in events:
            if event.type == "heartbeat":  # the history is replayed: the stream is now idle
                assert event.id is None and event.data == {}
                break
            replayed.append(event)
    assert replayed == [e for e in everything if e.id is not None and e.id > resume_after]


async def test_bad_last_event_id_is_400(client: TestClient) -> None:
    response = await client.get("/status/events", headers={"Last-Event-ID": "yesterday"})
    assert response.status == 400
    assert (await response.json())["error"]["type"]


async def test_a_slow_listener_is_dropped_without_slowing_the_others() -> None:
    hub = EventHub()
    slow, fast = hub.subscribe(), hub.subscribe()
    received = []
    for n in range(LISTENER_BUFFER + 1):
        hub.publish(EventType.PROGRESS, {"done": n})
        received.append(await fast.next(1))  # this listener keeps up
    assert [e.data["done"] for e in received if e] == list(range(LISTENER_BUFFER + 1))
    assert slow.lagged and slow.closed and hub.listeners == 1
    # The dropped listener still gets what it had buffered, then its stream ends.
    drained = [event async for event in slow]
    assert [e.data["done"] for e in drained] == list(range(LISTENER_BUFFER))


def test_fifty_listeners_do_not_change_any_request(
    tmp_path: Path, tiny_model_a: Path, tiny_model_b: Path
) -> None:
    args = ("--model-root", str(tiny_model_b.parent), "--events-heartbeat-s", "1")
    with running_server(
        tmp_path, model=str(tiny_model_a), args=args, env={"SERVING_ADMIN_TOKEN": "s3cret"}
    ) as server:

        async def listen(http: httpx.AsyncClient, started: asyncio.Event, counter: list[int]) -> list[Sse]:
            async with http.stream("GET", "/status/events") as response:
                seen = []
                async for event in sse_events(response.aiter_lines()):
                    seen.append(event)
                    if event.type == "snapshot":
                        counter.append(1)
                        if len(counter) == 50:
                            started.set()
                    if event.type == "outcome":
                        return seen
            return seen

        async def scenario() -> tuple[list[list[Sse]], list[httpx.Response], dict[str, Any]]:
            limits = httpx.Limits(max_connections=100)
            async with httpx.AsyncClient(base_url=server.base_url, timeout=120, limits=limits) as http:
                started, counter = asyncio.Event(), []
                listeners = [asyncio.create_task(listen(http, started, counter)) for _ in range(50)]
                await asyncio.wait_for(started.wait(), 60)
                deployed = await http.post("/model", json={"model_id": "tiny-b"}, headers=ADMIN)
                assert deployed.status_code == 202, deployed.text
                requests = [http.post("/completion", json=CHAT) for _ in range(8)]
                answers = await asyncio.gather(*requests)
                streams = await asyncio.wait_for(asyncio.gather(*listeners), 120)
                return streams, answers, deployed.json()

        streams, answers, deployment = asyncio.run(scenario())
        for answer in answers:
            assert answer.status_code == 200, answer.text
            assert answer.json()["finish_reason"] in ("stop", "length")
        for stream in streams:
            outcome = [e for e in stream if e.type == "outcome"]
            assert (
                outcome
                and outcome[-1].data["id"] == deployment["id"]
                and outcome[-1].data["phase"] == "ready"
            )
        # Connected listeners do not hold up a graceful shutdown: their streams end with the server.
        assert server.terminate() == 0


def test_a_hub_download_streams_byte_progress_and_counts_its_bytes(
    tmp_path: Path, tiny_model_a: Path, tiny_model_b: Path
) -> None:
    repo_bytes = sum(path.stat().st_size for path in tiny_model_b.iterdir() if path.is_file())
    with serving_repo("remote-org/tiny-chat", tiny_model_b) as endpoint:
        env = {"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
        with running_server(tmp_path, model=str(tiny_model_a), env=env) as server:

            async def deploy_and_listen() -> list[Sse]:
                async with (
                    httpx.AsyncClient(base_url=server.base_url, timeout=120) as http,
                    http.stream("GET", "/status/events") as response,
                ):
                    events = sse_events(response.aiter_lines())
                    assert (await anext(events)).type == "snapshot"
                    deployed = await http.post("/model", json={"model_id": "remote-org/tiny-chat"})
                    assert deployed.status_code == 202, deployed.text
                    return await _until_outcome(events, deployed.json()["id"])

            seen = asyncio.run(deploy_and_listen())
            metrics = httpx.get(f"{server.base_url}/metrics").text
    phases = [e.data["phase"] for e in seen if e.type == "phase"]
    assert phases == ["pending", "downloading", "loading", "warming", "ready"], seen[-1]
    download = [e.data for e in seen if e.type == "progress" and e.data["stage"] == "download"]
    assert download and {p["unit"] for p in download} == {"bytes"}
    done = [p["done"] for p in download]
    assert done == sorted(done) and download[-1]["done"] == download[-1]["total"] == repo_bytes, download
    assert seen[-1].data["progress"]["bytes_done"] == repo_bytes
    assert f"{MODEL_DOWNLOAD_BYTES_TOTAL} {float(repo_bytes)}" in metrics
