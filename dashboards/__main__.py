"""``python -m dashboards [--out DIR]``: write the dashboards (JSON) and the alert rules (YAML)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from dashboards import alert_rule_groups, all_dashboards
from dashboards.alerts import DEFAULT_JOB

RULES_FILE = "model-serving.rules.yaml"


def write(out: Path, *, job: str = DEFAULT_JOB, runbook_url: str | None = None) -> list[Path]:
    """Write every dashboard and the rule file into ``out``; return the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, dashboard in all_dashboards().items():
        path = out / name
        path.write_text(json.dumps(dashboard, indent=2, sort_keys=True) + "\n")
        written.append(path)
    rules = out / RULES_FILE
    groups = alert_rule_groups(job=job, runbook_url=runbook_url)
    rules.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False, width=1000))
    written.append(rules)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dashboards", description=__doc__)
    parser.add_argument(
        "--out", type=Path, default=Path("dist/dashboards"), help="output folder (default: %(default)s)"
    )
    parser.add_argument(
        "--job", default=DEFAULT_JOB, help="scrape job of the server's targets (default: %(default)s)"
    )
    parser.add_argument(
        "--runbook-url", default=None, help="README address for runbook_url annotations (default: none)"
    )
    args = parser.parse_args(argv)
    for path in write(args.out, job=args.job, runbook_url=args.runbook_url):
        print(path)


if __name__ == "__main__":
    main()
