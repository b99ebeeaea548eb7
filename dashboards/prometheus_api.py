"""A small client of Prometheus's HTTP API (stdlib only): enough to run the dashboards' queries."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


class PrometheusError(Exception):
    """Prometheus answered with ``status: error`` (a parse or evaluation error); the message says why."""


class PrometheusAPI:
    def __init__(self, base_url: str, timeout_s: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def get(self, path: str, **params: str | float | list[str]) -> Any:
        """GET ``/api/v1/<path>`` and return its ``data``; raise ``PrometheusError`` on an API error."""
        query = urllib.parse.urlencode(params, doseq=True)
        url = f"{self.base_url}/api/v1/{path}?{query}"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_s) as response:
                body = json.load(response)
        except urllib.error.HTTPError as e:
            # 400/422 carry the JSON error body (e.g. a PromQL parse error).
            body = json.load(e)
        if body.get("status") != "success":
            raise PrometheusError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, time: float) -> list[dict[str, Any]]:
        """Instant query: ``[{"metric": {...}, "value": [t, "v"]}]`` (a scalar is wrapped the same way)."""
        data = self.get("query", query=expr, time=time)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        """Range query, as a time series panel runs: ``[{"metric": {...}, "values": [[t, "v"], ...]}]``."""
        return self.get("query_range", query=expr, start=start, end=end, step=step)["result"]

    def label_values(self, label: str, match: str) -> list[str]:
        """What Grafana's ``label_values(match, label)`` variable query lists."""
        return self.get(f"label/{label}/values", **{"match[]": [match]})
