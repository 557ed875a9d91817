"""The Kubernetes and KServe manifests: valid against the Kubernetes schemas, and true to the service."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.config import Settings
from service.server.drain import IN_FLIGHT
from tests.conftest import ROOT

KUBERNETES = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
ISVC = ROOT / "deploy" / "kserve" / "inferenceservice.yaml"
VERSION = kubernetes_validate.latest_version()  # the schemas kubernetes-validate ships, offline


def _load(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(path.read_text())
    return document


def _by_kind() -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in map(_load, KUBERNETES)}


@pytest.mark.parametrize("path", KUBERNETES, ids=lambda p: p.name)
def test_each_manifest_is_valid_against_the_kubernetes_schemas(path: Path) -> None:
    kubernetes_validate.validate(_load(path), VERSION, strict=True)  # strict: unknown fields fail too


def test_the_kserve_predictor_is_a_valid_pod_spec() -> None:
    """The InferenceService CRD's schema is not available offline; its predictor holds a Kubernetes
    pod spec (containers, volumes), which is validated as one, and the rest is checked by hand."""
    isvc = _load(ISVC)
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    predictor = isvc["spec"]["predictor"]
    pod_fields = {k: v for k, v in predictor.items() if k in ("containers", "volumes", "terminationGracePeriodSeconds")}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"}, "spec": pod_fields}
    kubernetes_validate.validate(pod, VERSION, strict=True)
    assert set(predictor) - set(pod_fields) <= {"minReplicas", "maxReplicas", "scaleMetric", "scaleTarget"}
    container = predictor["containers"][0]
    assert container["name"] == "kserve-container"  # the name KServe routes to
    env = {e["name"]: e["value"] for e in container["env"]}
    assert int(env["ENCODER_PORT"]) == container["ports"][0]["containerPort"] == 8080


def test_the_pieces_fit_together() -> None:
    kinds = _by_kind()
    deployment, service, hpa = kinds["Deployment"], kinds["Service"], kinds["HorizontalPodAutoscaler"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    exposed = re.search(r"^EXPOSE (\d+) 8001$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)  # HTTP, gRPC
    assert exposed is not None
    assert container["ports"][0]["containerPort"] == int(exposed.group(1))
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["ENCODER_WEIGHTS"].startswith(mounts["weights"] + "/")
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("path", [*KUBERNETES, ISVC], ids=lambda p: p.name)
def test_every_setting_named_is_a_real_one(path: Path) -> None:
    names = set(re.findall(r"\bENCODER_[A-Z_]+", path.read_text()))
    known = {f"ENCODER_{field.upper()}" for field in Settings.model_fields}
    assert names <= known, names - known


@pytest.mark.parametrize("path", [KUBERNETES[0].parent / "deployment.yaml", ISVC], ids=lambda p: p.name)
def test_the_grace_period_covers_the_drain_and_what_is_in_flight(path: Path) -> None:
    document = _load(path)
    pod = document["spec"]["template"]["spec"] if document["kind"] == "Deployment" else document["spec"]["predictor"]
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    delay = float(env["ENCODER_SHUTDOWN_DELAY"])
    assert delay >= 5  # endpoint removal takes seconds to reach every proxy
    assert pod["terminationGracePeriodSeconds"] > delay + IN_FLIGHT


def _mebibytes(quantity: str) -> float:
    units = {"Ki": 2**-10, "Mi": 1, "Gi": 2**10}
    return float(quantity[:-2]) * units[quantity[-2:]]


def test_the_memory_budget_fits_the_pods_memory_limit() -> None:
    """As docs/operations.md sizes it: about 100 MiB for the process, then the budget per worker
    (tests/system/test_memory.py measures 300 clients of 13 MiB bodies peaking near 100 + budget)."""
    document = _load(KUBERNETES[0].parent / "deployment.yaml")
    container = document["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    budget = int(env["ENCODER_MEMORY_BUDGET"]) / 2**20
    workers = int(env["ENCODER_WORKERS"])
    assert 100 + workers * budget <= _mebibytes(container["resources"]["limits"]["memory"])
