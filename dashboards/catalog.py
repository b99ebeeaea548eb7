"""Every query the dashboards hold, flattened: what the tests run against Prometheus and the preview plots."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str  # file name in all_dashboards()
    panel_id: int
    panel: str  # panel title
    panel_type: str
    ref_id: str
    expr: str
    legend: str
    unit: str

    @property
    def key(self) -> str:
        """``"<panel title>/<refId>"``: how tests name a query."""
        return f"{self.panel}/{self.ref_id}"


def panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel of a dashboard (rows included), top-level and inside collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def panel_queries(dashboards: Mapping[str, Mapping[str, Any]]) -> list[PanelQuery]:
    return [
        PanelQuery(
            dashboard=name,
            panel_id=panel["id"],
            panel=panel["title"],
            panel_type=panel["type"],
            ref_id=target["refId"],
            expr=target["expr"],
            legend=target.get("legendFormat", ""),
            unit=panel.get("fieldConfig", {}).get("defaults", {}).get("unit", ""),
        )
        for name, dashboard in dashboards.items()
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
    ]
