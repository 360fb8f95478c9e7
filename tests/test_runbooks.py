"""Every shipped alert links a runbook entry of docs/DEPLOY.md under the configurable URL base."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "observability" / "alerts.yml"
DEPLOY = ROOT / "docs" / "DEPLOY.md"
BASE = "{{ with $externalLabels.runbook_base_url }}{{ . }}{{ else }}docs{{ end }}/DEPLOY.md#"


def alerts() -> list[dict[str, object]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_every_alert_has_a_runbook_url_under_the_configurable_base() -> None:
    for rule in alerts():
        url = rule["annotations"]["runbook_url"]  # type: ignore[index]
        assert url == BASE + str(rule["alert"]).lower(), rule["alert"]


def test_every_alert_has_a_runbook_entry_in_deploy_md() -> None:
    runbooks = DEPLOY.read_text().split("\n## Runbooks\n", 1)[1]
    headings = {h.strip().lower() for h in re.findall(r"^### (.+)$", runbooks, re.MULTILINE)}
    names = [str(rule["alert"]) for rule in alerts()]
    assert len(names) >= 10
    assert {n.lower() for n in names} <= headings, sorted({n.lower() for n in names} - headings)
