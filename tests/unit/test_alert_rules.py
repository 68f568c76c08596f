"""The model quality alerts (deploy/prometheus/alerts.yml) checked and unit-tested by promtool
(Debian's ``prometheus`` package; `make test` and .ci/run install it), wired into the
compose stack's Prometheus, and written on metrics the gateway exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

from gateway.quality import EXPORTED

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "alerts.yml"
RULES_TEST = PROMETHEUS / "alerts_test.yml"


def promtool(*args: str) -> str:
    """promtool's output; the test fails (never skips) without it, or when it fails."""
    found = shutil.which("promtool")
    assert found, "promtool is missing: apt-get install prometheus (Debian's package has it)"
    run = subprocess.run([found, *args], capture_output=True, text=True, timeout=60)
    out = run.stdout + run.stderr
    assert run.returncode == 0, f"promtool {' '.join(args)} failed:\n{out}"
    return out


def alerts() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_promtool_checks_the_rules_and_the_config_that_loads_them() -> None:
    assert "SUCCESS: 3 rules found" in promtool("check", "rules", str(RULES))
    # The config names alerts.yml (relative to itself: /etc/prometheus in the container).
    assert "SUCCESS" in promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]


def test_promtool_test_rules_each_alert_fires_when_it_should_and_only_then() -> None:
    assert "SUCCESS" in promtool("test", "rules", str(RULES_TEST))
    # Every alert is tested firing (and so, at other times or on other series, not).
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    firing = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    quiet = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if not case.get("exp_alerts")
    }
    names = {rule["alert"] for rule in alerts()}
    assert names == {"BatcheryModelDrift", "BatcheryLowConfidence", "BatcheryLiveAccuracyLow"}
    assert firing == names and quiet == names


def test_the_rules_read_only_what_the_gateway_exports() -> None:
    named = {m for rule in alerts() for m in re.findall(r"\bbatchery_[a-z_0-9]+", rule["expr"])}
    assert named and named <= set(EXPORTED), named - set(EXPORTED)
    for rule in alerts():  # one alert however many gateways export the figure
        assert "max by (model, version)" in rule["expr"], rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}
