"""Panel factories over grafana-foundation-sdk: every panel of the project gets its queries, datasource,
unit and thresholds the same way, so a dashboard module only says what to show.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dashboard_builders
from grafana_foundation_sdk.builders import prometheus, stat, statetimeline, timeseries
from grafana_foundation_sdk.models import common, dashboard

from dashboards.promql import DATASOURCE_VAR

#: Every panel and query reads from the datasource picked in the dashboard's ``datasource`` variable.
DATASOURCE = common.DataSourceRef(type_val="prometheus", uid=f"${{{DATASOURCE_VAR}}}")

Builder = timeseries.Panel | stat.Panel | statetimeline.Panel

GREEN, YELLOW, RED, BLUE = "green", "yellow", "red", "blue"


@dataclass(frozen=True)
class Query:
    """One PromQL target of a panel; ``legend`` is Grafana's legend template (``{{label}}``)."""

    expr: str
    legend: str = "__auto"


def thresholds(base: str, *steps: tuple[float, str]) -> dashboard_builders.ThresholdsConfig:
    """Absolute thresholds: ``base`` colour below the first step, then each ``(value, colour)``."""
    return (
        dashboard_builders.ThresholdsConfig()
        .mode(dashboard.ThresholdsMode.ABSOLUTE)
        .steps(
            [dashboard.Threshold(value=None, color=base)]
            + [dashboard.Threshold(value=v, color=c) for v, c in steps]
        )
    )


def value_text(mapping: dict[str, tuple[str, str]]) -> list[dashboard.ValueMapping]:
    """Value mappings ``{"1": ("Ready", "green")}``: show text and colour instead of a number."""
    return [
        dashboard.ValueMap(
            options={
                value: dashboard.ValueMappingResult(text=text, color=color, index=i)
                for i, (value, (text, color)) in enumerate(mapping.items())
            }
        )
    ]


def _targets(queries: Sequence[Query], *, instant: bool) -> list[prometheus.Dataquery]:
    targets = []
    for i, q in enumerate(queries):
        target = prometheus.Dataquery().ref_id(chr(ord("A") + i)).expr(q.expr).legend_format(q.legend)
        target = target.datasource(DATASOURCE)
        targets.append(target.instant() if instant else target.range())
    return targets


def _legend() -> common_builders.VizLegendOptions:
    return (
        common_builders.VizLegendOptions()
        .display_mode(common.LegendDisplayMode.LIST)
        .placement(common.LegendPlacement.BOTTOM)
        .show_legend(True)
    )


def _tooltip() -> common_builders.VizTooltipOptions:
    return (
        common_builders.VizTooltipOptions()
        .mode(common.TooltipDisplayMode.MULTI)
        .sort(common.SortOrder.DESCENDING)
    )


def time_series(
    title: str,
    description: str,
    queries: Sequence[Query],
    *,
    unit: str,
    width: int,
    height: int = 8,
    limits: dashboard_builders.ThresholdsConfig | None = None,
    bars: bool = False,
) -> timeseries.Panel:
    """A time series panel; ``limits`` are drawn as dashed lines so the healthy range is visible."""
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .targets(_targets(queries, instant=False))
        .unit(unit)
        .min(0)
        .span(width)
        .height(height)
        .legend(_legend())
        .tooltip(_tooltip())
        .fill_opacity(10)
        .draw_style(common.GraphDrawStyle.BARS if bars else common.GraphDrawStyle.LINE)
    )
    if limits is not None:
        panel = panel.thresholds(limits).thresholds_style(
            common_builders.GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.DASHED)
        )
    return panel


def single_stat(
    title: str,
    description: str,
    query: Query,
    *,
    unit: str,
    width: int,
    height: int = 4,
    limits: dashboard_builders.ThresholdsConfig | None = None,
    mappings: list[dashboard.ValueMapping] | None = None,
    show_name: bool = False,
) -> stat.Panel:
    """A stat panel of the latest value; ``show_name`` prints the legend (a label) instead of the number."""
    panel = (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .targets(_targets([query], instant=True))
        .unit(unit)
        .span(width)
        .height(height)
        .graph_mode(common.BigValueGraphMode.NONE)
        .color_mode(common.BigValueColorMode.VALUE)
        .text_mode(common.BigValueTextMode.NAME if show_name else common.BigValueTextMode.VALUE)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .thresholds(limits or thresholds(BLUE))
    )
    if mappings:
        panel = panel.mappings(mappings)
    return panel


def state_timeline(
    title: str,
    description: str,
    query: Query,
    *,
    width: int,
    height: int = 8,
    mappings: list[dashboard.ValueMapping],
) -> statetimeline.Panel:
    """A state timeline: one lane per series, coloured by the value mappings."""
    return (
        statetimeline.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .targets(_targets([query], instant=False))
        .span(width)
        .height(height)
        .mappings(mappings)
        .show_value(common.VisibilityMode.NEVER)
        .merge_values(True)
        .legend(_legend())
        .tooltip(_tooltip())
    )
