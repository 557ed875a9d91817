"""The Kubernetes and KServe manifests: valid against the Kubernetes schemas (and KServe's own
types, as its Python SDK declares them), and true to the service: their probes, run as the kubelet
runs them against `encoding-service serve`, say ready when it is and not while it drains."""

from __future__ import annotations

import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.config import Settings
from service.server.drain import IN_FLIGHT
from tests.conftest import ROOT, Server, start_server

KUBERNETES = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
ISVC = ROOT / "deploy" / "kserve" / "inferenceservice.yaml"
GRPC_ISVC = ROOT / "deploy" / "kserve" / "inferenceservice-grpc.yaml"
RUNTIME = ROOT / "deploy" / "kserve" / "servingruntime.yaml"
KSERVE = [ISVC, GRPC_ISVC, RUNTIME]
SERVE = [sys.executable, "-m", "service.cli", "serve", "--port", "{port}"]
VERSION = kubernetes_validate.latest_version()  # the schemas kubernetes-validate ships, offline


def _load(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(path.read_text())
    return document


def _by_kind() -> dict[str, dict[str, Any]]:
    """The manifests by kind; the Services by name."""
    documents = list(map(_load, KUBERNETES))
    kinds = {doc["kind"]: doc for doc in documents if doc["kind"] != "Service"}
    return kinds | {doc["metadata"]["name"]: doc for doc in documents if doc["kind"] == "Service"}


def _conforms(value: Any, declared: str, where: str) -> list[str]:
    """What in `value` does not fit the type `declared` as KServe's SDK declares its CRDs' types
    (generated from the same Go types as the CRDs' schemas) and the Kubernetes client its own:
    an unknown field, or a value of the wrong kind. Strict, as kubernetes-validate is above."""
    import kserve.models
    import kubernetes.client.models

    quantity = (str, int, float)  # "500m", 1, 0.5
    scalars = {
        "str": str,
        "int": int,
        "bool": bool,
        "float": (int, float),
        "object": object,
        "ResourceQuantity": quantity,
    }
    if declared in scalars:
        return [] if isinstance(value, scalars[declared]) else [f"{where}: {value!r} is not {declared}"]
    if listed := re.fullmatch(r"[Ll]ist\[(.+)\]", declared):
        if not isinstance(value, list):
            return [f"{where}: not a list"]
        return [error for i, item in enumerate(value) for error in _conforms(item, listed.group(1), f"{where}[{i}]")]
    if mapped := re.fullmatch(r"(?:dict\(|Dict\[)str, (.+)[)\]]", declared):
        if not isinstance(value, dict):
            return [f"{where}: not a mapping"]
        return [error for key, item in value.items() for error in _conforms(item, mapped.group(1), f"{where}.{key}")]
    model = getattr(kserve.models, declared, None) or getattr(kubernetes.client.models, declared)
    if not isinstance(value, dict):
        return [f"{where}: not a {declared}"]
    fields = {json: python for python, json in model.attribute_map.items()}
    errors = [f"{where}.{key}: no such field in {declared}" for key in value if key not in fields]
    return errors + [
        error
        for key, item in value.items()
        if key in fields
        for error in _conforms(item, model.openapi_types[fields[key]], f"{where}.{key}")
    ]


@pytest.mark.parametrize("path", KUBERNETES, ids=lambda p: p.name)
def test_each_manifest_is_valid_against_the_kubernetes_schemas(path: Path) -> None:
    kubernetes_validate.validate(_load(path), VERSION, strict=True)  # strict: unknown fields fail too


@pytest.mark.parametrize("path", KSERVE, ids=lambda p: p.name)
def test_each_kserve_manifest_fits_kserve_s_types(path: Path) -> None:
    """The CRDs' schemas are not available offline (2 MB for the InferenceService's alone); KServe's
    SDK declares the same types, field by field, down to the Kubernetes ones inside."""
    document = _load(path)
    declared = {"InferenceService": "V1beta1InferenceService", "ClusterServingRuntime": "V1alpha1ClusterServingRuntime"}
    assert document["apiVersion"] in ("serving.kserve.io/v1beta1", "serving.kserve.io/v1alpha1")
    assert _conforms(document, declared[document["kind"]], document["kind"]) == []
    assert _conforms({"kind": "Nope", "spec": {"predictor": {"minReplica": 1}}}, "V1beta1InferenceService", "x") == [
        "x.spec.predictor.minReplica: no such field in V1beta1PredictorSpec"
    ]  # and the check is strict


def test_the_kserve_predictor_is_a_valid_pod_spec() -> None:
    """The REST predictor's pod spec (containers, volumes) is validated as a Kubernetes pod spec too."""
    isvc = _load(ISVC)
    predictor = isvc["spec"]["predictor"]
    pod_fields = {k: v for k, v in predictor.items() if k in ("containers", "volumes", "terminationGracePeriodSeconds")}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"}, "spec": pod_fields}
    kubernetes_validate.validate(pod, VERSION, strict=True)
    container = predictor["containers"][0]
    assert container["name"] == "kserve-container"  # the name KServe routes to
    env = {e["name"]: e["value"] for e in container["env"]}
    assert int(env["ENCODER_PORT"]) == container["ports"][0]["containerPort"] == 8080


def test_the_grpc_inference_service_fits_its_runtime() -> None:
    """protocolVersion grpc-v2 on the runtime that declares it; gRPC routed to the port named h2c
    (KServe routes to a port whose name says h2c or grpc), where the service listens and the probes
    look; the model repository where KServe puts storageUri."""
    model = _load(GRPC_ISVC)["spec"]["predictor"]["model"]
    runtime = _load(RUNTIME)
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] == "grpc-v2"
    assert "grpc-v2" in runtime["spec"]["protocolVersions"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"
    merged = container | {"ports": model["ports"]}  # the model's fields over the runtime's container, as KServe does
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [merged]}}
    kubernetes_validate.validate(pod, VERSION, strict=True)
    env = {e["name"]: e["value"] for e in container["env"]}
    (port,) = model["ports"]
    assert port["name"] == "h2c"
    assert port["containerPort"] == int(env["ENCODER_GRPC_PORT"])
    assert {container["readinessProbe"]["grpc"]["port"], container["livenessProbe"]["grpc"]["port"]} == {
        port["containerPort"]
    }
    assert env["ENCODER_MODEL_REPOSITORY"] == "/mnt/models"  # where KServe's storage initializer writes


def test_the_pieces_fit_together() -> None:
    kinds = _by_kind()
    deployment, service, hpa = kinds["Deployment"], kinds["encoding-service"], kinds["HorizontalPodAutoscaler"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    exposed = re.search(r"^EXPOSE (\d+) (\d+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)  # HTTP, gRPC
    assert exposed is not None
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert (ports["http"], ports["grpc"]) == (int(exposed.group(1)), int(exposed.group(2)))
    assert ports["grpc"] == Settings.model_fields["grpc_port"].default  # the default: no ENCODER_GRPC_PORT set
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["grpc"]["port"] == ports["grpc"]
    for service in (kinds["encoding-service"], kinds["encoding-service-grpc"]):
        assert service["spec"]["selector"].items() <= labels.items()
        grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
        assert grpc_port["targetPort"] == "grpc"
        assert grpc_port["appProtocol"] == "kubernetes.io/h2c"
    assert kinds["encoding-service-grpc"]["spec"]["clusterIP"] == "None"  # headless: clients see every pod
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["ENCODER_WEIGHTS"].startswith(mounts["weights"] + "/")
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("path", [*KUBERNETES, *KSERVE], ids=lambda p: p.name)
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


def _passes(probe: dict[str, Any], server: Server) -> bool:
    """Whether a probe passes as the kubelet runs it, against `server` wherever the manifest's port
    is: gRPC's grpc.health.v1 Check says SERVING; an httpGet answers 200-399."""
    if "grpc" in probe:
        with grpc.insecure_channel(server.grpc) as channel:
            request = health_pb2.HealthCheckRequest(service=probe["grpc"].get("service", ""))
            try:
                answer = health_pb2_grpc.HealthStub(channel).Check(request, timeout=1)
            except grpc.RpcError:
                return False
            return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)
    status = httpx.get(server.url + probe["httpGet"]["path"], timeout=1).status_code
    return 200 <= status < 400


def test_the_probes_pass_when_ready_and_readiness_fails_at_once_on_sigterm() -> None:
    """Every probe the manifests declare, against `encoding-service serve`: all pass once it is
    ready; on SIGTERM the readiness probes fail within a second, the liveness probes keep passing
    through the drain (a failing one would have the kubelet kill a pod that is draining)."""
    deployment = _by_kind()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    runtime = _load(RUNTIME)["spec"]["containers"][0]
    rest = _load(ISVC)["spec"]["predictor"]["containers"][0]
    containers = {"deployment": deployment, "servingruntime": runtime, "inferenceservice": rest}
    probes = {f"{name} {kind}": c[kind] for name, c in containers.items() for kind in c if kind.endswith("Probe")}
    assert sum("grpc" in p for p in probes.values()) >= 5
    server = start_server(SERVE, shutdown_delay="3")
    try:
        assert {name: _passes(p, server) for name, p in probes.items()} == dict.fromkeys(probes, True)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(1)
        passing = {name: _passes(p, server) for name, p in probes.items()}
        assert passing == {name: "liveness" in name for name in probes}
    finally:
        server.stop()
