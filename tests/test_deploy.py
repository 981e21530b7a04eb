"""The Kubernetes and KServe manifests in deploy/, checked offline (no cluster exists on the test machines).

Built-in kinds are validated against the Kubernetes OpenAPI schemas that kubernetes-validate ships, in
their strict form (an unknown field is an error, as `kubectl apply`'s server-side field validation makes
it); custom resources against the CRD schemas vendored in deploy/schemas/ (see its README), with their
metadata against the built-in ObjectMeta. A manifest whose kind neither covers fails: nothing in deploy/
goes unchecked. Then what the schemas cannot know: that the manifests fit this service and each other.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from importlib import resources
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml
from dockerfile_parse import DockerfileParser

from service.settings import Settings
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
SCHEMAS = DEPLOY / "schemas"
# The oldest and the newest minor version that kubernetes-validate ships strict schemas for, of those
# checked here: autoscaling/v2 and everything else used is GA in both.
KUBERNETES_VERSIONS = ("1.29", "1.37")
MANIFESTS = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml", ".json") and SCHEMAS not in p.parents)
PROBES = {"readinessProbe": "/healthz/ready", "livenessProbe": "/healthz/live"}


class Unchecked(Exception):
    """A manifest of a kind that no schema here covers."""


def documents() -> list[tuple[str, dict]]:
    out = []
    for path in MANIFESTS:
        # JSON is YAML too: a manifest in either form is checked.
        for i, doc in enumerate(d for d in yaml.safe_load_all(path.read_text()) if d is not None):
            out.append((f"{path.relative_to(DEPLOY)}#{i}", doc))
    return out


def by_kind(kind: str) -> list[dict]:
    return [doc for _, doc in documents() if doc.get("kind") == kind]


def custom_schema_path(doc: dict) -> Path:
    group, _, version = doc["apiVersion"].rpartition("/")
    return SCHEMAS / f"{doc['kind'].lower()}_{group}_{version}.json"


def _k8s_schema_dir(version: str):
    return resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{version}.0-local-strict"


def object_meta_errors(metadata: dict, version: str) -> list[str]:
    """`metadata` against the built-in ObjectMeta (strict), the check the API server makes on any object."""
    folder = _k8s_schema_dir(version)
    schema = json.loads((folder / "objectmeta-meta-v1.json").read_text())
    definitions = json.loads((folder / "_definitions.json").read_text())
    registry = referencing.Registry().with_resources(
        [(s["$id"], referencing.Resource.from_contents(s)) for s in (schema, definitions)])
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    return [f"metadata.{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(metadata)]


def check(doc: dict, version: str) -> None:
    """Raise if `doc` is invalid for Kubernetes `version`, or Unchecked if nothing here can tell."""
    if not isinstance(doc, dict) or not {"apiVersion", "kind"} <= doc.keys():
        raise Unchecked(f"not a Kubernetes object: {str(doc)[:200]}")
    group = doc["apiVersion"].rpartition("/")[0]
    if "." in group and not group.endswith(".k8s.io"):
        # A custom resource: only a vendored CRD schema can check it.
        path = custom_schema_path(doc)
        if not path.is_file():
            raise Unchecked(f"no schema for {doc['kind']} {doc['apiVersion']}: expected {path.relative_to(ROOT)}")
        schema = json.loads(path.read_text())
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in jsonschema.Draft202012Validator(schema).iter_errors(doc)]
        errors += object_meta_errors(doc.get("metadata", {}), version)
        if errors:
            raise jsonschema.ValidationError("\n".join(errors))
        return
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.SchemaNotFoundError as exc:
        raise Unchecked(exc.message) from None


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name, doc", documents(), ids=[name for name, _ in documents()])
def test_manifest_passes_its_schema(name, doc, version):
    check(doc, version)


def test_every_expected_manifest_is_there():
    kinds = sorted((doc["apiVersion"], doc["kind"]) for _, doc in documents())
    assert kinds == sorted([
        ("apps/v1", "Deployment"), ("v1", "Service"), ("autoscaling/v2", "HorizontalPodAutoscaler"),
        ("monitoring.coreos.com/v1", "PodMonitor"), ("serving.kserve.io/v1beta1", "InferenceService")])
    assert (DEPLOY / "kserve" / "inferenceservice.yaml").is_file()
    # Each vendored schema is there for a manifest, and says where it came from.
    used = {custom_schema_path(doc) for _, doc in documents() if "." in doc["apiVersion"].rpartition("/")[0]}
    assert used == set(SCHEMAS.glob("*.json"))
    readme = (SCHEMAS / "README.md").read_text()
    for path in used:
        assert path.name in readme, f"{path.name} is not described in deploy/schemas/README.md"
        assert "vendor_crd.py" in json.loads(path.read_text())["$comment"]


@pytest.mark.parametrize("doc", [
    {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}},
    {"apiVersion": "v1", "kind": "Widget", "metadata": {"name": "w"}},
    {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": {"name": "w"}, "spec": {}},
    {"kind": "Deployment"},
], ids=["custom-group", "core-group", "crd-not-vendored", "no-apiVersion"])
def test_a_kind_nothing_covers_fails(doc):
    with pytest.raises(Unchecked):
        check(doc, KUBERNETES_VERSIONS[-1])


def _mutations():
    """(id, kind, change) each of which a strict schema must reject."""
    def container(doc):
        if doc["kind"] == "InferenceService":
            return doc["spec"]["predictor"]["containers"][0]
        return doc["spec"]["template"]["spec"]["containers"][0]

    def endpoint(doc):
        return doc["spec"]["podMetricsEndpoints"][0]

    return [
        ("deployment-unknown-field", "Deployment", lambda d: container(d).update(readinessProbes=[])),
        ("deployment-bad-type", "Deployment", lambda d: container(d)["ports"][0].update(containerPort="http")),
        ("service-unknown-field", "Service", lambda d: d["spec"].update(selectors={})),
        ("hpa-v1-field-in-v2", "HorizontalPodAutoscaler",
         lambda d: d["spec"].update(targetCPUUtilizationPercentage=70)),
        ("podmonitor-unknown-field", "PodMonitor", lambda d: endpoint(d).update(metricsPath="/m")),
        ("podmonitor-bad-interval", "PodMonitor", lambda d: endpoint(d).update(interval="5 s")),
        ("podmonitor-bad-metadata", "PodMonitor", lambda d: d["metadata"].update(label={"a": "b"})),
        ("podmonitor-no-selector", "PodMonitor", lambda d: d["spec"].pop("selector")),
        ("isvc-unknown-field", "InferenceService", lambda d: container(d).update(readinessProbes=[])),
        ("isvc-bad-scale-metric", "InferenceService", lambda d: d["spec"]["predictor"].update(scaleMetric="gpu")),
        ("isvc-no-predictor", "InferenceService", lambda d: d["spec"].pop("predictor")),
        ("isvc-bad-metadata", "InferenceService", lambda d: d["metadata"].update(annotations={"a": 1})),
    ]


@pytest.mark.parametrize("kind, change", [m[1:] for m in _mutations()], ids=[m[0] for m in _mutations()])
def test_schemas_reject_invalid_manifests(kind, change):
    [doc] = by_kind(kind)
    check(doc, KUBERNETES_VERSIONS[-1])
    broken = copy.deepcopy(doc)
    change(broken)
    with pytest.raises(jsonschema.ValidationError):
        check(broken, KUBERNETES_VERSIONS[-1])


def _pod(doc: dict) -> dict:
    return doc["spec"]["predictor"] if doc["kind"] == "InferenceService" else doc["spec"]["template"]["spec"]


def _exposed_port() -> str:
    [port] = [i["value"] for i in DockerfileParser(str(ROOT / "docker" / "service.Dockerfile")).structure
              if i["instruction"] == "EXPOSE"]
    return port


def _image_user() -> int:
    users = [i["value"] for i in DockerfileParser(str(ROOT / "docker" / "service.Dockerfile")).structure
             if i["instruction"] == "USER"]
    return int(users[-1].split(":")[0])


@pytest.mark.parametrize("kind", ["Deployment", "InferenceService"])
def test_pods_run_the_service_as_compose_does(kind):
    [doc] = by_kind(kind)
    pod = _pod(doc)
    [container] = pod["containers"]
    api = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["api"]
    assert container["image"] == api["image"] == "instanas-api:latest"
    # The same settings as docker-compose.yml, and each one a real setting of the service.
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env == {k: str(v) for k, v in api["environment"].items()}
    for key in env:
        assert key.startswith("INSTANAS_") and key.removeprefix("INSTANAS_").lower() in Settings.model_fields, key
    [port] = container["ports"]
    assert str(port["containerPort"]) == _exposed_port() == "8000"
    for probe, path in PROBES.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert get["port"] in (port["containerPort"], port.get("name")), get
    assert container["readinessProbe"]["periodSeconds"] < container["livenessProbe"]["periodSeconds"]
    resources_ = container["resources"]
    for name in ("cpu", "memory"):
        assert resources_["requests"][name] and resources_["limits"][name], name
    assert _quantity(resources_["requests"]["cpu"]) <= _quantity(resources_["limits"]["cpu"])
    assert _quantity(resources_["requests"]["memory"]) <= _quantity(resources_["limits"]["memory"])
    # Non-root, read-only root filesystem, nothing to escalate to; /tmp is the one writable path.
    security = {**pod.get("securityContext", {}), **container["securityContext"]}
    assert security["runAsNonRoot"] is True and security["runAsUser"] == _image_user() != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert [m["mountPath"] for m in container["volumeMounts"]] == ["/tmp"]
    assert {v["name"] for v in pod["volumes"]} == {m["name"] for m in container["volumeMounts"]}


def _quantity(value: str | int) -> float:
    """A Kubernetes quantity (500m, 2, 512Mi, 1Gi) as a number."""
    units = {"m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    number, unit = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value)).groups()
    return float(number) * units[unit]


def test_service_hpa_and_podmonitor_select_the_deployment():
    [deployment] = by_kind("Deployment")
    [service] = by_kind("Service")
    [hpa] = by_kind("HorizontalPodAutoscaler")
    [monitor] = by_kind("PodMonitor")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    port_names = {p["name"] for p in container["ports"]}

    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names

    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment",
                                                                     deployment["metadata"]["name"])
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    # The HPA owns the replica count: a `replicas` in the Deployment would reset it on every apply.
    assert "replicas" not in deployment["spec"]

    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
    # The same interval as docker/prometheus.yml, under compose.
    [job] = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())["scrape_configs"]
    assert endpoint["interval"] == job["scrape_interval"]


def test_inferenceservice_is_a_custom_predictor_on_port_8000():
    [isvc] = by_kind("InferenceService")
    predictor = isvc["spec"]["predictor"]
    # A custom container, not one of KServe's model-format runtimes.
    assert set(predictor) & {"model", "sklearn", "onnx", "pytorch", "triton"} == set()
    [container] = predictor["containers"]
    assert container["ports"] == [{"containerPort": 8000, "protocol": "TCP"}]
    annotations = isvc["metadata"]["annotations"]
    assert annotations["prometheus.kserve.io/port"] == "8000"
    assert annotations["prometheus.kserve.io/path"] == "/metrics"
    assert predictor["scaleMetric"] == "cpu"
    text = (DEPLOY / "kserve" / "inferenceservice.yaml").read_text()
    assert "Open Inference Protocol v2" in text


def _vendor_crd():
    spec = importlib.util.spec_from_file_location("vendor_crd", SCHEMAS / "vendor_crd.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_crd_conversion_is_strict_where_the_crd_is():
    """vendor_crd.py on a small CRD with each construct it converts."""
    crd = yaml.safe_load("""
    spec:
      group: example.com
      names: {kind: Gadget}
      versions:
        - name: v1
          schema:
            openAPIV3Schema:
              type: object
              properties:
                apiVersion: {type: string}
                kind: {type: string}
                metadata: {type: object}
                spec:
                  type: object
                  required: [port]
                  x-kubernetes-validations: [{rule: "self.port > 0"}]
                  properties:
                    port:
                      anyOf: [{type: integer}, {type: string}]
                      x-kubernetes-int-or-string: true
                    name: {type: string, nullable: true, description: dropped}
                    ratio: {type: number, minimum: 0, exclusiveMinimum: true}
                    free: {type: object, x-kubernetes-preserve-unknown-fields: true}
                    labels: {type: object, additionalProperties: {type: string}}
                    empty: {type: object}
                    items:
                      type: array
                      items: {type: object, properties: {a: {type: string}}}
                    either:
                      type: object
                      properties: {a: {type: string}, b: {type: string}}
                      oneOf: [{required: [a]}, {required: [b]}]
    """)
    vendor = _vendor_crd()
    schema = vendor.crd_schema(crd, "v1", source="a test")
    validator = jsonschema.Draft202012Validator(schema)
    good = {"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "g", "anything": 1},
            "spec": {"port": "http", "name": None, "ratio": 0.5, "free": {"x": {"y": 1}}, "labels": {"a": "b"},
                     "empty": {}, "items": [{"a": "b"}], "either": {"a": "x"}}}
    assert not list(validator.iter_errors(good))
    assert "description" not in json.dumps(schema)
    bad = [
        ("apiVersion", "example.com/v2"), ("kind", "Gizmo"), ("extra", 1),
        ("spec.extra", 1), ("spec.port", 1.5), ("spec.ratio", 0), ("spec.labels", {"a": 1}),
        ("spec.empty", {"x": 1}), ("spec.items", [{"b": "c"}]), ("spec.either", {"a": "x", "b": "y"}),
    ]
    for path, value in bad:
        doc = copy.deepcopy(good)
        *parents, last = path.split(".")
        target = doc
        for part in parents:
            target = target[part]
        target[last] = value
        assert list(validator.iter_errors(doc)), f"{path}={value!r} should be rejected"
    missing = copy.deepcopy(good)
    del missing["spec"]["port"]
    assert list(validator.iter_errors(missing))
    # Pruning keeps the listed paths whole and rejects everything else.
    pruned = vendor.crd_schema(crd, "v1", keep=["spec.port", "spec.either"])
    assert set(pruned["properties"]["spec"]["properties"]) == {"port", "either"}
    assert pruned["properties"]["spec"]["required"] == ["port"]
    assert list(jsonschema.Draft202012Validator(pruned).iter_errors(good))
    with pytest.raises(KeyError):
        vendor.crd_schema(crd, "v1", keep=["spec.nothing"])
