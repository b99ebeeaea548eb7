"""The console's HTTP side, in-process: the page and its assets with their security headers, the
off switch, and ``GET /status/load`` (its figures checked against known metric changes)."""

from __future__ import annotations

import glob
import tomllib
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from service.api.console import CONTENT_SECURITY_POLICY, STATIC_DIR
from service.api.load import LATENCY_WINDOW_S, SAMPLE_INTERVAL_S, LoadSampler, quantile
from service.metrics import ServingMetrics
from tests.test_api import CHAT, assert_error, start


async def test_page_and_assets_carry_security_headers(
    aiohttp_client: Any, tmp_path: Path, tiny_model_a: Path
) -> None:
    client = await start(aiohttp_client, tmp_path, tiny_model_a)
    page = await client.get("/")
    assert page.status == 200 and page.content_type == "text/html"
    assert page.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert "'unsafe-inline'" not in CONTENT_SECURITY_POLICY
    html = await page.text()
    assert 'src="/console/js/main.js"' in html and "<script>" not in html and "style=" not in html
    # Module scripts run only with a JavaScript media type (nosniff forbids guessing).
    for path, media_types in (
        ("/console/js/main.js", ("text/javascript", "application/javascript")),
        ("/console/console.css", ("text/css",)),
    ):
        asset = await client.get(path)
        assert asset.status == 200 and asset.content_type in media_types, path
        assert asset.headers["X-Content-Type-Options"] == "nosniff"
        assert asset.headers["Referrer-Policy"] == "no-referrer"
    for escape in ("/console/../settings.py", "/console/%2e%2e/settings.py"):
        response = await client.get(escape)
        assert_error(response.status, await response.json(), 404)


def test_every_console_file_ships_in_the_package() -> None:
    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    package_dir = STATIC_DIR.parent.parent  # service/
    shipped = {
        path
        for pattern in pyproject["tool"]["setuptools"]["package-data"]["service"]
        for path in glob.glob(pattern, root_dir=package_dir)
    }
    files = {str(f.relative_to(package_dir)) for f in STATIC_DIR.rglob("*") if f.is_file()}
    assert files and files <= shipped, sorted(files - shipped)


async def test_console_can_be_turned_off(aiohttp_client: Any, tmp_path: Path, tiny_model_a: Path) -> None:
    client = await start(aiohttp_client, tmp_path, tiny_model_a, console=False)
    for path in ("/", "/console/js/main.js"):
        response = await client.get(path)
        assert_error(response.status, await response.json(), 404)
    assert (await client.get("/status/load")).status == 200  # an API endpoint, not part of the page


async def test_load_endpoint_reports_a_request(
    aiohttp_client: Any, tmp_path: Path, tiny_model_a: Path
) -> None:
    client = await start(aiohttp_client, tmp_path, tiny_model_a, max_running_requests=3)
    assert (await client.post("/completion", json=CHAT)).status == 200
    load = await (await client.get("/status/load")).json()
    assert load["max_running"] == 3 and load["queued"] == 0
    assert (
        load["ttft_p95_s"] is not None and load["ttft_p95_s"] > 0
    )  # the request came after the first sample


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_sampler_rates_and_percentiles_cover_their_windows() -> None:
    metrics = ServingMetrics.create(CollectorRegistry())
    clock = Clock()
    sampler = LoadSampler(metrics, max_running=4, clock=clock)
    sampler.record()
    empty = sampler.summary()
    assert empty.tokens_per_s == 0 and empty.ttft_p95_s is None
    for ttft in [0.02] * 19 + [3.0]:  # 95% at or under 0.025 s
        metrics.time_to_first_token.observe(ttft)
    for _ in range(3):  # 10 tokens every 5 s
        metrics.generation_tokens.labels("m").inc(10)
        clock.now += SAMPLE_INTERVAL_S
        sampler.record()
    metrics.generation_tokens.labels("m").inc(10)
    metrics.num_requests_running.set(2)
    metrics.num_requests_waiting.set(5)
    clock.now += 2.0
    summary = sampler.summary()
    assert (summary.running, summary.queued, summary.max_running) == (2, 5, 4)
    # The rate covers the samples of the last ~10 s: from the one at 12 s ago, 30 tokens.
    assert summary.tokens_window_s == 12.0 and summary.tokens_per_s == 2.5
    assert summary.ttft_window_s == 17.0 and summary.ttft_p95_s == pytest.approx(0.025)
    # Five minutes later those requests have left the window.
    for _ in range(int(LATENCY_WINDOW_S / SAMPLE_INTERVAL_S) + 2):
        clock.now += SAMPLE_INTERVAL_S
        sampler.record()
    later = sampler.summary()
    assert later.ttft_p95_s is None and later.tokens_per_s == 0 and later.ttft_window_s <= LATENCY_WINDOW_S


def test_quantile_interpolates_like_histogram_quantile() -> None:
    inf = float("inf")
    assert quantile(0.5, [(1.0, 0), (2.0, 10), (inf, 10)]) == pytest.approx(1.5)
    assert quantile(0.95, [(1.0, 5), (inf, 10)]) == 1.0  # in the +Inf bucket: the highest finite bound
    assert quantile(0.95, [(1.0, 0), (inf, 0)]) is None
