"""deploy/k8s: the worker and gateway Deployments and KEDA's ScaledObject, checked against
their schemas (Kubernetes' own, from kubernetes-validate; KEDA's CRD, vendored) and against
what Batchery really exports and reads. Not run on a cluster here."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from gateway.guard import GatewayMetrics
from producer.settings import Settings
from worker.metrics import EXPORTED

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES = "1.33"


def documents() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]  # fmt: skip


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in documents() if doc["kind"] == kind]


def deployment(component: str) -> dict[str, Any]:
    [found] = [d for d in of_kind("Deployment")
               if d["metadata"]["labels"]["app.kubernetes.io/component"] == component]  # fmt: skip
    return found


@pytest.mark.parametrize("doc", [d for d in documents() if d["kind"] != "ScaledObject"],
                         ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")  # fmt: skip
def test_kubernetes_objects_match_kubernetes_schema(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES, strict=True)  # strict: no unknown fields


def test_a_typo_is_caught_by_the_schema_check() -> None:
    doc = deployment("worker")
    broken = {**doc, "spec": {**doc["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def keda_schema() -> dict[str, Any]:
    crd = yaml.safe_load((K8S / "schemas" / "keda.sh_scaledobjects.yaml").read_text())
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return dict(version["schema"]["openAPIV3Schema"])


def test_the_scaled_object_matches_kedas_crd() -> None:
    [scaled] = of_kind("ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    jsonschema.validate(scaled, keda_schema())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**scaled, "spec": {**scaled["spec"], "minReplicaCount": "one"}},
                            keda_schema())  # fmt: skip


def test_keda_scales_the_worker_deployment_on_the_backlog_both_sides_export() -> None:
    [scaled] = of_kind("ScaledObject")
    worker = deployment("worker")
    assert scaled["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                "name": worker["metadata"]["name"]}  # fmt: skip
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    meta = trigger["metadata"]
    # The keys KEDA's prometheus scaler reads (pkg/scalers/prometheus_scaler.go), no others.
    assert set(meta) <= {"serverAddress", "query", "threshold", "activationThreshold",
                         "namespace", "ignoreNullValues", "unsafeSsl", "timeout"}  # fmt: skip
    assert {"serverAddress", "query", "threshold"} <= set(meta)
    assert all(isinstance(value, str) for value in meta.values())  # a map of strings
    # Every worker and every gateway exports the same deployment-wide figure: max, not sum.
    assert meta["query"] == 'max(batchery_backlog_jobs{queue="batchery"})'
    assert "batchery_backlog_jobs" in EXPORTED
    gateway_names = {m.name for m in GatewayMetrics().registry.collect()}
    assert "batchery_backlog_jobs" in gateway_names
    # A missing figure is an error (KEDA holds the fallback), never a zero that scales down.
    assert meta["ignoreNullValues"] == "false" and scaled["spec"]["fallback"]["replicas"] >= 1
    assert float(meta["threshold"]) > 0


class ReadNames(dict[str, str]):
    """An empty environment that remembers every name read from it."""

    def __init__(self) -> None:
        super().__init__()
        self.read: set[str] = set()

    def get(self, name: str, default: Any = None) -> Any:
        self.read.add(name)
        return super().get(name, default)

    def __getitem__(self, name: str) -> str:
        self.read.add(name)
        return super().__getitem__(name)

    def __contains__(self, name: object) -> bool:
        self.read.add(str(name))
        return super().__contains__(name)


def settings_names() -> set[str]:
    """The variables Settings.from_env reads, as it reads them."""
    env = ReadNames()
    Settings.from_env(env)
    return env.read


def test_settings_names_are_read_from_from_env_itself() -> None:
    names = settings_names()
    assert {"BATCHERY_REDIS_URL", "BATCHERY_METRICS_PORT", "BATCHERY_BATCH_BUDGET_MS"} <= names
    assert "BATCHERY_NOT_A_SETTING" not in names


def test_containers_run_commands_and_settings_batchery_has() -> None:
    known = settings_names()
    for component, command in (("worker", "worker"), ("gateway", "serve")):
        [container] = deployment(component)["spec"]["template"]["spec"]["containers"]
        assert container["args"][0] == command
        names = [env["name"] for env in container["env"]]
        assert "BATCHERY_REDIS_URL" in names
        for name in names:  # every variable is one Settings.from_env reads
            assert name in known, name
    [worker] = deployment("worker")["spec"]["template"]["spec"]["containers"]
    port = next(e["value"] for e in worker["env"] if e["name"] == "BATCHERY_METRICS_PORT")
    assert [p["containerPort"] for p in worker["ports"]] == [int(port)]
    annotations = deployment("worker")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == port
    # Compose runs the same worker command.
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["services"]["worker"]["command"] == worker["args"]


def test_the_manifests_say_they_were_not_run_on_a_cluster() -> None:
    for path in K8S.glob("*.yaml"):
        assert re.search(r"not run on\s+(#\s*)?a\s+(#\s*)?cluster here", path.read_text()), path


def test_the_readme_and_docs_show_the_trigger_as_deployed() -> None:
    [scaled] = of_kind("ScaledObject")
    meta = scaled["spec"]["triggers"][0]["metadata"]
    for page in (ROOT / "README.md", ROOT / "docs" / "scaling.md"):
        text = page.read_text()
        assert f"query: {meta['query']}" in text, page
        assert f'threshold: "{meta["threshold"]}"' in text, page
