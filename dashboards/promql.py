"""PromQL building blocks shared by the dashboards and the alert rules, and Grafana's variable expansion.

Every query of the project is written with these helpers, so label selectors and histogram
arithmetic are spelled once. Metric names come from ``service.metrics``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

#: Grafana template variables the dashboard queries use (see ``dashboards.serving``).
NAMESPACE_VAR = "namespace"
POD_VAR = "pod"
DATASOURCE_VAR = "datasource"
RATE_INTERVAL = "$__rate_interval"

#: Restricts a dashboard query to the namespace and pods picked in the variables.
#: ``pod`` is multi-valued with an "All" option, so it is matched as a regular expression.
DASHBOARD_SELECTOR = f'namespace="${NAMESPACE_VAR}", pod=~"${POD_VAR}"'


def selector(metric: str, *matchers: str) -> str:
    """``metric{matcher, ...}``; an empty matcher list gives the bare metric name."""
    inner = ", ".join(m for m in matchers if m)
    return f"{metric}{{{inner}}}" if inner else metric


def by(labels: Sequence[str]) -> str:
    """The ``by (...)`` clause of an aggregation, or nothing when ``labels`` is empty."""
    return f" by ({', '.join(labels)})" if labels else ""


def rate(metric: str, *matchers: str, window: str, group: Sequence[str] = ()) -> str:
    """Per-second rate of a counter, summed over everything but ``group``."""
    return f"sum{by(group)} (rate({selector(metric, *matchers)}[{window}]))"


def quantile(q: float, histogram: str, *matchers: str, window: str, group: Sequence[str] = ()) -> str:
    """The ``q`` quantile of a Prometheus histogram over ``window``, per ``group``."""
    buckets = rate(f"{histogram}_bucket", *matchers, window=window, group=("le", *group))
    return f"histogram_quantile({q}, {buckets})"


def ratio(numerator: str, denominator: str, *matchers: str, window: str, group: Sequence[str] = ()) -> str:
    """Rate of counter ``numerator`` over rate of counter ``denominator``, per ``group``."""
    over = {"window": window, "group": group}
    return f"{rate(numerator, *matchers, **over)} / {rate(denominator, *matchers, **over)}"


def mean(histogram: str, *matchers: str, window: str, group: Sequence[str] = ()) -> str:
    """Mean observation of a Prometheus histogram over ``window``, per ``group``."""
    return ratio(f"{histogram}_sum", f"{histogram}_count", *matchers, window=window, group=group)


def grafana_rate_interval(step_s: float, scrape_interval_s: float) -> str:
    """What Grafana substitutes for ``$__rate_interval``: max(step + scrape interval, 4 x scrape interval).

    See https://grafana.com/docs/grafana/latest/datasources/prometheus/template-variables/.
    """
    return f"{round(max(step_s + scrape_interval_s, 4 * scrape_interval_s) * 1000)}ms"


_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def expand_variables(expr: str, values: Mapping[str, str]) -> str:
    """Substitute ``$name`` and ``${name}`` the way Grafana does before sending a query.

    Values are used as given: a single picked value of a regex-matched variable needs no escaping
    when it holds no regex metacharacters (pod and namespace names never do). An unknown variable
    raises ``KeyError``, so a typo in a query cannot pass a test by staying unexpanded.
    """
    return _VARIABLE.sub(lambda m: values[m.group(1) or m.group(2)], expr)
