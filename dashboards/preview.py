"""A picture of a dashboard drawn with matplotlib from Prometheus's answers to its queries.

No Grafana server runs where the tests do, so this is the proof-by-eye that the panels have data:
the live test (tests/test_dashboards_prometheus.py) renders it after real traffic. Set
``DASHBOARDS_PREVIEW_OUT=docs/dashboard-preview.png`` on that test to refresh the README's image.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display where tests run

import matplotlib.pyplot as plt

from dashboards.catalog import panels
from dashboards.prometheus_api import PrometheusAPI
from dashboards.promql import expand_variables

COLUMNS = 4
_LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def _legend(template: str, labels: Mapping[str, str]) -> str:
    if template in ("", "__auto"):
        return ",".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "__name__") or "value"
    return _LEGEND_LABEL.sub(lambda m: labels.get(m.group(1), ""), template)


def _value_texts(panel: Mapping[str, Any]) -> dict[str, str]:
    """Value mappings of a panel, as ``{"1": "Ready"}``."""
    return {
        value: result.get("text", value)
        for mapping in panel.get("fieldConfig", {}).get("defaults", {}).get("mappings", [])
        for value, result in mapping.get("options", {}).items()
    }


def _stat_text(panel: Mapping[str, Any], series: list[dict[str, Any]]) -> str:
    if not series:
        return "No data"
    if panel["options"].get("textMode") == "name":
        return "\n".join(_legend(panel["targets"][0].get("legendFormat", ""), s["metric"]) for s in series)
    raw = series[0]["value"][1]
    mapped = _value_texts(panel).get(raw)
    if mapped is not None:
        return mapped
    value, unit = float(raw), panel["fieldConfig"]["defaults"].get("unit", "")
    if unit == "percentunit":
        return f"{value:.1%}"
    if unit == "s":
        return f"{value:.0f} s"
    return f"{value:.3g} {unit}".strip()


def render_preview(
    api: PrometheusAPI,
    dashboard: Mapping[str, Any],
    *,
    start: float,
    end: float,
    step: float,
    variables: Mapping[str, str],
    out: Path,
) -> Path:
    """Draw every panel of ``dashboard`` over ``[start, end]`` (time axis in seconds from ``start``)."""
    shown = [p for p in panels(dashboard) if p["type"] != "row"]
    rows = math.ceil(len(shown) / COLUMNS)
    fig, axes = plt.subplots(rows, COLUMNS, figsize=(COLUMNS * 4.5, rows * 2.8), squeeze=False)
    for ax, panel in zip(axes.flat, shown, strict=False):
        ax.set_title(panel["title"], fontsize=9, loc="left")
        ax.tick_params(labelsize=7)
        if panel["type"] == "stat":
            expr = expand_variables(panel["targets"][0]["expr"], variables)
            ax.text(0.5, 0.45, _stat_text(panel, api.query(expr, end)), ha="center", va="center", fontsize=14)
            ax.set_axis_off()
            continue
        texts = _value_texts(panel)
        for target in panel["targets"]:
            expr = expand_variables(target["expr"], variables)
            for s in api.query_range(expr, start, end, step):
                times = [float(t) - start for t, _ in s["values"]]
                values = [float(v) for _, v in s["values"]]
                label = _legend(target.get("legendFormat", ""), s["metric"])
                ax.plot(
                    times, values, linewidth=1.2, label=label, drawstyle="steps-post" if texts else "default"
                )
        if texts:
            ax.set_yticks([float(v) for v in texts], list(texts.values()))
        ax.set_xlim(0, end - start)
        ax.set_xlabel("seconds into the test run", fontsize=7)
        ax.set_ylabel(panel["fieldConfig"]["defaults"].get("unit", "").removeprefix("suffix:"), fontsize=7)
        if ax.has_data():
            ax.legend(fontsize=6, loc="upper left")
        else:
            ax.text(0.5, 0.5, "No data", ha="center", va="center", transform=ax.transAxes, color="grey")
    for ax in axes.flat[len(shown) :]:
        ax.set_axis_off()
    fig.suptitle(
        f"{dashboard['title']}: every panel's query run against a local Prometheus scraping a real server "
        "(matplotlib rendering, not Grafana)",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # room for the title
    out.parent.mkdir(parents=True, exist_ok=True)
    # No timestamp or version in the PNG metadata: only the data makes two renderings differ.
    fig.savefig(out, dpi=80, metadata={"Software": None})
    plt.close(fig)
    return out
