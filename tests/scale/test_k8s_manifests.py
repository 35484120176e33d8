"""deploy/k8s: every built-in resource validates (strictly: no unknown fields) against the Kubernetes
JSON schemas shipped offline in the `kubernetes-validate` package; the CRD resources (PodMonitor,
KEDA ScaledObject), whose schemas are not available here, get structural checks; and the pieces fit
together (probes, GPU, cache volume, selectors, the autoscaling metric the service exports).
No cluster: nothing here is applied."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.30.0"  # the oldest Kubernetes these manifests claim to work with
CRD_KINDS = {"PodMonitor": "monitoring.coreos.com/v1", "ScaledObject": "keda.sh/v1alpha1"}


def resources() -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in sorted(K8S.rglob("*.yaml")):
        found += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in resources() if doc["kind"] == kind]


def test_every_builtin_resource_validates_strictly() -> None:
    checked = 0
    for path, doc in resources():
        if doc["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.relative_to(ROOT)}: {doc['kind']}: {exc}")
        checked += 1
    assert checked >= 5, checked


def test_the_validator_rejects_a_broken_manifest() -> None:
    (deployment,) = by_kind("Deployment")
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["prot"] = 8000
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    broken = copy.deepcopy(deployment)
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_crd_resources_have_the_expected_shape() -> None:
    for kind, api_version in CRD_KINDS.items():
        (doc,) = by_kind(kind)
        assert doc["apiVersion"] == api_version
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    (monitor,) = by_kind("PodMonitor")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["port"] == container()["ports"][0]["name"]
    assert {"sourceLabels": ["__meta_kubernetes_pod_name"], "targetLabel": "replica"} in endpoint["relabelings"]
    (scaled,) = by_kind("ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == by_kind("Deployment")[0]["metadata"]["name"]
    assert "lightvlm_requests_waiting" in scaled["spec"]["triggers"][0]["metadata"]["query"]


def container() -> dict[str, Any]:
    (deployment,) = by_kind("Deployment")
    (main,) = deployment["spec"]["template"]["spec"]["containers"]
    return main


def test_deployment_probes_gpu_and_cache_volume() -> None:
    main = container()
    assert main["startupProbe"]["httpGet"]["path"] == "/ready"
    startup = main["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60  # room for a model download
    assert main["livenessProbe"]["httpGet"]["path"] == "/health"
    assert main["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert main["resources"]["limits"]["nvidia.com/gpu"] == "1"
    env = {e["name"]: e for e in main["env"]}
    mounts = {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
    assert mounts["hf-cache"] == env["HF_HOME"]["value"]
    assert env["LIGHTVLM_REPLICA_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    (deployment,) = by_kind("Deployment")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    claim = volumes["hf-cache"]["persistentVolumeClaim"]["claimName"]
    assert claim in {doc["metadata"]["name"] for doc in by_kind("PersistentVolumeClaim")}


def test_service_and_autoscaler_point_at_the_deployment() -> None:
    (deployment,) = by_kind("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    (service,) = by_kind("Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == container()["ports"][0]["name"]
    (hpa,) = by_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "lightvlm_requests_waiting"
    (rules,) = by_kind("ConfigMap")
    assert "lightvlm_requests_waiting" in yaml.safe_load(rules["data"]["config.yaml"])["rules"][0]["seriesQuery"]


def test_the_scaling_metric_is_one_the_service_exports() -> None:
    from app.metrics import ServiceMetrics

    body = ServiceMetrics("m").registry
    names = {metric.name for metric in body.collect()}
    assert "lightvlm_requests_waiting" in names
