"""The monitoring files in deploy/: promtool accepts them; the dashboard and provisioning hang together."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.debian_tools import require

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "policy-gateway.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yaml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "policy-gateway.yaml"


def promtool() -> str:
    return require("promtool", "prometheus")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def query_panels() -> list[dict[str, Any]]:
    return [panel for panel in dashboard()["panels"] if panel["type"] != "row"]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(PROMETHEUS / "alerts.yml")["groups"] for rule in group["rules"]]


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["check", "config", "prometheus.yml"], id="promtool accepts the Prometheus config"),
        pytest.param(["check", "rules", "alerts.yml"], id="promtool accepts the alert rules"),
        pytest.param(["test", "rules", "alerts_test.yml"], id="every alert rule unit test passes"),
    ],
)
def test_promtool(args: list[str]) -> None:
    """promtool exits 0 on the deploy/prometheus files."""
    result = subprocess.run(
        [promtool(), *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}\n{result.stderr}"


def test_prometheus_config_scrapes_the_gateway_and_loads_the_alerts() -> None:
    """The config scrapes gateway:9090 as job policy-gateway, loads alerts.yml and talks to Alertmanager."""
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "policy-gateway"]
    assert job["static_configs"][0]["targets"] == ["gateway:9090"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert config["rule_files"] == ["alerts.yml"]
    assert (PROMETHEUS / "alerts.yml").is_file()
    (manager,) = config["alerting"]["alertmanagers"]
    assert manager["static_configs"][0]["targets"] == ["alertmanager:9093"]


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: f"{rule['alert']} is complete")
def test_alert_rule_has_for_severity_and_annotations(rule: dict[str, Any]) -> None:
    """Every alert waits with `for:`, carries a severity, and explains itself."""
    assert rule.get("for"), rule["alert"]
    assert rule["labels"]["severity"] in {"critical", "warning", "info"}
    assert rule["annotations"]["summary"].strip()
    assert rule["annotations"]["description"].strip()


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: f"{rule['alert']} is tested both ways")
def test_alert_rule_has_a_firing_and_a_silent_case(rule: dict[str, Any]) -> None:
    """alerts_test.yml holds a case where the alert fires and one where it must not."""
    cases = [
        case
        for test in load_yaml(PROMETHEUS / "alerts_test.yml")["tests"]
        for case in test.get("alert_rule_test", [])
        if case["alertname"] == rule["alert"]
    ]
    assert any(case["exp_alerts"] for case in cases), f"no case fires {rule['alert']}"
    assert any(not case["exp_alerts"] for case in cases), f"no case keeps {rule['alert']} silent"


def test_dashboard_identity_and_datasource_variable() -> None:
    """The dashboard has its fixed uid and picks its Prometheus through a `datasource` variable."""
    board = dashboard()
    assert board["uid"] == "policy-gateway"
    assert board["schemaVersion"] >= 36
    assert "__inputs" not in board
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "${DS_PROMETHEUS}" not in DASHBOARD.read_text(encoding="utf-8")


def test_dashboard_ids_are_unique() -> None:
    """Panel ids are unique, and so are variable names."""
    board = dashboard()
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    names = [v["name"] for v in board["templating"]["list"]]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("panel", query_panels(), ids=lambda panel: f"panel {panel['title']!r} is complete")
def test_dashboard_panel(panel: dict[str, Any]) -> None:
    """Each panel uses the datasource variable, says what it shows, and queries with PromQL."""
    source = {"type": "prometheus", "uid": "${datasource}"}
    assert panel["datasource"] == source
    assert panel.get("description", "").strip()
    assert panel["targets"]
    for target in panel["targets"]:
        assert target["datasource"] == source
        assert target["expr"].strip()
        # Rate windows follow Grafana's interval (or the whole range), never a hard-coded duration.
        windows = set(re.findall(r"\[([^\]]+)\]", target["expr"]))
        assert windows <= {"$__rate_interval", "$__range"}, target["expr"]
        if re.search(r"\b(rate|increase)\(", target["expr"]):
            assert windows, target["expr"]


def test_grafana_datasource_provisioning() -> None:
    """The provisioned data source is the Prometheus at http://prometheus:9090 with uid prometheus."""
    (source,) = load_yaml(DATASOURCES)["datasources"]
    assert source["type"] == "prometheus"
    assert source["uid"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    scrape_interval = load_yaml(PROMETHEUS / "prometheus.yml")["global"]["scrape_interval"]
    assert source["jsonData"]["timeInterval"] == scrape_interval


def test_grafana_dashboard_provisioning_points_where_the_readme_says() -> None:
    """The file provider reads the directory the README mounts the dashboards at."""
    (provider,) = load_yaml(PROVIDERS)["providers"]
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    assert path == "/var/lib/grafana/dashboards"
    readme = (GRAFANA / "README.md").read_text(encoding="utf-8")
    assert f"./deploy/grafana/dashboards:{path}" in readme
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning" in readme
    assert f"| `dashboards/` (holds `{DASHBOARD.name}`) | `{path}` |" in readme
