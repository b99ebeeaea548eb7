"""Every dashboard query and alert rule, run by a real Prometheus scraping a real server process.

One Prometheus (Debian package, loopback, temp data dir, 1 s scrapes, the alert rules loaded) and one
server serve the whole module. The server answers completions, deploys a second model and answers
more; then each query is expanded as Grafana would expand it and sent through the HTTP API.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from dashboards import alert_rule_groups, all_dashboards
from dashboards.__main__ import RULES_FILE, write
from dashboards.alerts import DEFAULT_JOB
from dashboards.catalog import PanelQuery, panel_queries
from dashboards.preview import render_preview
from dashboards.prometheus_api import PrometheusAPI, PrometheusError
from dashboards.promql import NAMESPACE_VAR, POD_VAR, expand_variables, grafana_rate_interval
from dashboards.serving import FILE_NAME
from service import metrics as m
from service.api import paths
from tests.server_process import free_port, running_server

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="prometheus missing: install the prometheus Debian package"
)

SCRAPE_INTERVAL_S = 1.0
#: Labels Prometheus Operator would put on a pod's target; here static, so the dashboard selectors match.
TARGET_LABELS = {NAMESPACE_VAR: "dashboards-test", POD_VAR: "model-server-0"}
#: As Grafana would expand them with this namespace and pod picked, over a range of 1 s steps.
VARIABLES = {
    **TARGET_LABELS,
    "__rate_interval": grafana_rate_interval(step_s=SCRAPE_INTERVAL_S, scrape_interval_s=SCRAPE_INTERVAL_S),
}
WAIT_S = 60.0
#: Traffic per model, and how many completions are in flight at once.
TRAFFIC_S = 8.0
CONCURRENCY = 4

#: Queries ("<panel title>/<refId>") that stay empty after healthy traffic, and why.
# The rejected/cancelled counters have data: the server creates them at 0 for each known reason.
# The engine's per-request histograms (queue, prefill, decode, end-to-end latency, prompt and
# generation lengths) are defined but not yet observed by the engine on this branch; they fill in
# (and these entries must go) once the engine observes them.
EXPECTED_EMPTY: set[str] = {
    "Request time by phase (mean)/A",
    "Request time by phase (mean)/B",
    "Request time by phase (mean)/C",
    "Queue time share of latency/A",
    "Engine latency p95 by finish reason/A",
    "Prompt length p50 / p95/A",
    "Prompt length p50 / p95/B",
    "Generation length p50 / p95/A",
    "Generation length p50 / p95/B",
}


def wait_for(what: str, condition: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.2)


@contextmanager
def running_prometheus(workdir: Path, target: str) -> Iterator[PrometheusAPI]:
    """Prometheus on a free loopback port scraping ``target`` every second, with our alert rules loaded."""
    write(workdir)  # the rule file next to the config
    config = {
        "global": {
            "scrape_interval": f"{SCRAPE_INTERVAL_S:g}s",
            "evaluation_interval": f"{SCRAPE_INTERVAL_S:g}s",
        },
        "rule_files": [RULES_FILE],
        "scrape_configs": [
            {
                "job_name": DEFAULT_JOB,
                "metrics_path": paths.METRICS,
                "static_configs": [{"targets": [target], "labels": TARGET_LABELS}],
            }
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (workdir / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    api = PrometheusAPI(f"http://127.0.0.1:{port}")
    try:
        wait_for("Prometheus to be ready", lambda: _answers(f"{api.base_url}/-/ready"))
        yield api
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _values(api: PrometheusAPI, expr: str, at: float) -> list[float]:
    return [float(s["value"][1]) for s in api.query(expr, at)]


@dataclass(frozen=True)
class TrafficRun:
    api: PrometheusAPI
    start: float
    end: float


def _complete(client: httpx.Client, i: int) -> None:
    body = {"messages": [{"role": "user", "content": f"hello number {i}"}], "max_tokens": 8}
    response = client.post(paths.COMPLETION, json=body)
    assert response.status_code == 200, response.text


def _serve_traffic(client: httpx.Client, seconds: float) -> None:
    """Waves of concurrent completions (so the engine batches and the queue moves) for ``seconds``.

    Long enough for several scrapes, so rates and quantiles have points to draw.
    """
    deadline = time.monotonic() + seconds
    with ThreadPoolExecutor(max_workers=CONCURRENCY) as pool:
        while time.monotonic() < deadline:
            list(pool.map(lambda i: _complete(client, i), range(CONCURRENCY)))


@pytest.fixture(scope="module")
def traffic(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_a: Path, tiny_model_b: Path, models_root: Path
) -> Iterator[TrafficRun]:
    workdir = tmp_path_factory.mktemp("dashboards-live")
    with (
        running_server(
            workdir / "server", model=str(tiny_model_a), args=("--model-root", str(models_root))
        ) as server,
        running_prometheus(workdir, f"127.0.0.1:{server.port}") as api,
        httpx.Client(base_url=server.base_url, timeout=60) as client,
    ):
        wait_for("the first scrape", lambda: _values(api, f'up{{job="{DEFAULT_JOB}"}}', time.time()) == [1.0])
        start = time.time()
        _serve_traffic(client, TRAFFIC_S)
        # An invalid request, so a 4xx status is in the mix.
        assert 400 <= client.post(paths.COMPLETION, json={"messages": []}).status_code < 500
        assert client.post(paths.MODEL, json={"model_id": str(tiny_model_b)}).status_code == 202
        wait_for(
            "the second model to serve",
            lambda: (client.get(paths.STATUS).json()["deployment"] or {}).get("phase") == "ready",
        )
        _serve_traffic(client, TRAFFIC_S)
        traffic_end = time.time()
        # Bounded wait until Prometheus has scraped past the traffic and evaluated every rule once.
        wait_for(
            "a scrape after the traffic",
            lambda: min(_values(api, f"timestamp({m.MODEL_READY})", time.time()) or [0]) > traffic_end + 1,
        )
        wait_for(
            "every rule to be evaluated",
            # Prometheus reports Go's zero time for a rule it has not evaluated yet.
            lambda: all(
                not rule["lastEvaluation"].startswith("0001-")
                for group in api.get("rules")["groups"]
                for rule in group["rules"]
            ),
        )
        yield TrafficRun(api, start, time.time())


def _has_data(result: list[dict[str, Any]]) -> bool:
    """Grafana draws something: at least one series with a finite sample."""
    samples = [v for s in result for _, v in s.get("values", [s.get("value", (0, "NaN"))])]
    return any(math.isfinite(float(v)) for v in samples)


def _run(traffic: TrafficRun, query: PanelQuery) -> list[dict[str, Any]]:
    """The query as Grafana sends it: instant for a stat panel, a range query with 1 s steps otherwise."""
    expr = expand_variables(query.expr, VARIABLES)
    if query.panel_type == "stat":
        return traffic.api.query(expr, traffic.end)
    return traffic.api.query_range(expr, traffic.start, traffic.end, SCRAPE_INTERVAL_S)


def test_every_panel_query_parses_and_has_data_unless_listed_empty(traffic: TrafficRun) -> None:
    queries = panel_queries(all_dashboards())
    errors: dict[str, str] = {}
    empty: set[str] = set()
    for query in queries:
        try:
            result = _run(traffic, query)
        except PrometheusError as e:
            errors[query.key] = f"{e}\n    {query.expr}"
            continue
        if not _has_data(result):
            empty.add(query.key)
    assert not errors, "\n".join(f"{k}: {v}" for k, v in errors.items())
    assert {q.key for q in queries} >= EXPECTED_EMPTY, "EXPECTED_EMPTY names a query that no longer exists"
    assert empty == EXPECTED_EMPTY


def test_variable_queries_list_the_scraped_namespace_and_pod(traffic: TrafficRun) -> None:
    """The namespace and pod variables, as Grafana resolves ``label_values(<series>, <label>)``."""
    variables = {v["name"]: v for v in all_dashboards()[FILE_NAME]["templating"]["list"]}
    for name in (NAMESPACE_VAR, POD_VAR):
        query = variables[name]["query"]
        assert query.startswith("label_values(") and query.endswith(f", {name})"), query
        match = expand_variables(query.removeprefix("label_values(").removesuffix(f", {name})"), VARIABLES)
        assert traffic.api.label_values(name, match) == [TARGET_LABELS[name]]


def test_every_rule_evaluates_and_none_fires_on_a_healthy_server(traffic: TrafficRun) -> None:
    loaded = {rule["name"]: rule for group in traffic.api.get("rules")["groups"] for rule in group["rules"]}
    ours = [rule for group in alert_rule_groups() for rule in group["rules"]]
    assert set(loaded) == {rule["alert"] for rule in ours}
    for rule in ours:
        assert loaded[rule["alert"]]["health"] == "ok", loaded[rule["alert"]].get("lastError")
        assert loaded[rule["alert"]]["state"] == "inactive", rule["alert"]
        assert traffic.api.query(rule["expr"], traffic.end) == [], rule["alert"]


def test_preview_renders_from_the_run(traffic: TrafficRun, tmp_path: Path) -> None:
    # DASHBOARDS_PREVIEW_OUT=docs/dashboard-preview.png refreshes the README's picture; else a temp file.
    out = Path(os.environ.get("DASHBOARDS_PREVIEW_OUT", tmp_path / "preview.png"))
    render_preview(
        traffic.api,
        all_dashboards()[FILE_NAME],
        start=traffic.start,
        end=traffic.end,
        step=SCRAPE_INTERVAL_S,
        variables=VARIABLES,
        out=out,
    )
    assert out.read_bytes().startswith(b"\x89PNG")
