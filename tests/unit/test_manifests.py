"""The deployment files against Kubernetes and against the server, so that neither can rot unseen.

- Every Kubernetes object under ``deploy/kubernetes/`` validates against the Kubernetes JSON schemas bundled with
  ``kubernetes-validate`` (offline, strict: an unknown field fails), for the oldest and newest version named below.
- The custom resources (KServe ``ClusterServingRuntime`` and ``InferenceService``, KEDA ``ScaledObject``) carry the
  fields their controllers require (``CRD_SCHEMAS``, a small schema of our own: no CRD is bundled anywhere offline).
- The objects agree with each other (selectors, port names, the names an HPA or InferenceService points at) and
  every kustomization lists files that exist, and every manifest is in a kustomization.
- Drift against the server: every ``--flag`` in a manifest exists in ``ferry serve --help``; the ports in args,
  container ports, Services and probes are the server's defaults; the grace period covers preStop, drain and grace.
  (Metric names in the autoscaling queries and the probe routes are checked against a live server in
  tests/integration/test_deploy.py.)
- The ``Containerfile``: a non-root user, ``ENTRYPOINT ["ferry", "serve"]`` over ``/models``, the server's ports
  exposed, a health check against the readiness route, a baked Numba cache.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
CONTAINERFILE = ROOT / "Containerfile"
KUBERNETES_VERSIONS = ("1.29.0", "1.33.0")
"""The oldest Kubernetes the manifests target (native gRPC probes are GA since 1.27; 1.29 is the oldest release still
commonly supported by managed clusters) and a recent one; kubernetes-validate bundles both schemas."""
CRD_GROUPS = ("serving.kserve.io/", "keda.sh/")
MARGIN_S = 5
"""terminationGracePeriodSeconds = preStop sleep + --drain-delay-s + --shutdown-grace-s + this margin."""


def documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every Kubernetes object in deploy/kubernetes (kustomization files apart)."""
    for path in sorted(KUBERNETES.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                yield path, doc


def ident(item: tuple[Path, dict[str, Any]]) -> str:
    path, doc = item
    return f"{path.relative_to(KUBERNETES)}:{doc['kind']}/{doc['metadata']['name']}"


DOCS = list(documents())
BUILTIN = [d for d in DOCS if not d[1]["apiVersion"].startswith(CRD_GROUPS)]
CUSTOM = [d for d in DOCS if d[1]["apiVersion"].startswith(CRD_GROUPS)]


def one(kind: str, name: str | None = None, where: str = "") -> dict[str, Any]:
    found = [
        doc
        for path, doc in DOCS
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name) and where in str(path)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''} in {where or 'deploy/kubernetes'}, found {len(found)}"
    return found[0]


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "Deployment":
        return list(doc["spec"]["template"]["spec"]["containers"])
    if doc["kind"] == "ClusterServingRuntime":
        return list(doc["spec"]["containers"])
    return []


def flag_values(args: list[str]) -> dict[str, str | None]:
    """``--name=value`` / ``--name value`` / ``--switch`` in a container's args."""
    values: dict[str, str | None] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        assert arg.startswith("--"), f"argument {arg!r} is not a --flag"
        if "=" in arg:
            name, value = arg.split("=", 1)
            values[name] = value
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            values[arg] = args[i + 1]
            i += 1
        else:
            values[arg] = None
        i += 1
    return values


@functools.cache
def serve_help() -> str:
    """``ferry serve --help``, as a user sees it."""
    done = subprocess.run(
        [sys.executable, "-m", "ferry.server", "serve", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout


def help_flags() -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", serve_help()))


def help_default(flag: str) -> str:
    """The default ``--help`` gives for ``flag``: its entry (from its line to the next option's) ends with
    "(default: X)"."""
    entries = re.split(r"\n(?=  -)", serve_help())
    (entry,) = [e for e in entries if re.match(r"\s*" + re.escape(flag) + r"\b", e)]
    match = re.search(r"\(default: ([^)]+)\)", " ".join(entry.split()))
    assert match, f"--help gives no default for {flag}"
    return match.group(1)


# ---- Kubernetes schemas


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("item", BUILTIN, ids=ident)
def test_builtin_objects_validate_against_the_kubernetes_schemas(
    item: tuple[Path, dict[str, Any]], version: str
) -> None:
    _, doc = item
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as err:
        pytest.fail(f"{ident(item)} is not valid Kubernetes {version}: {err.message} at {list(err.path)}")


def test_the_validator_rejects_what_kubernetes_would() -> None:
    """The schemas are really applied: an unknown field and a mistyped port fail."""
    deployment = json.loads(json.dumps(one("Deployment", "ferry")))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["startupProbe"]["grpc"]["prot"] = 8001
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)
    del container["startupProbe"]["grpc"]["prot"]
    container["ports"][0]["containerPort"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}
_METADATA = {"type": "object", "required": ["name"], "properties": {"name": _NAME}}
_PORT = {
    "type": "object",
    "required": ["containerPort"],
    "properties": {
        "containerPort": {"type": "integer", "minimum": 1, "maximum": 65535},
        "name": {"type": "string"},
        "protocol": {"enum": ["TCP", "UDP", "SCTP"]},
    },
}
_CONTAINER = {
    "type": "object",
    "required": ["name", "image"],
    "properties": {
        "name": {"type": "string"},
        "image": {"type": "string", "minLength": 1},
        "args": {"type": "array", "items": {"type": "string"}},
        "ports": {"type": "array", "items": _PORT},
    },
}
_PROTOCOLS = ["v1", "v2", "grpc-v1", "grpc-v2"]
CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    # KServe serving.kserve.io/v1alpha1 ServingRuntimeSpec: formats, protocols, containers (what the controller reads)
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["supportedModelFormats", "containers"],
                "properties": {
                    "supportedModelFormats": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["name"],
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                "version": {"type": "string"},
                                "autoSelect": {"type": "boolean"},
                                "priority": {"type": "integer", "minimum": 1},
                            },
                        },
                    },
                    "protocolVersions": {"type": "array", "items": {"enum": _PROTOCOLS}, "uniqueItems": True},
                    "containers": {"type": "array", "minItems": 1, "items": _CONTAINER},
                    "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                },
            },
        },
    },
    # KServe serving.kserve.io/v1beta1 InferenceService with a predictor.model (the new-style model spec)
    ("serving.kserve.io/v1beta1", "InferenceService"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["predictor"],
                "properties": {
                    "predictor": {
                        "type": "object",
                        "required": ["model"],
                        "properties": {
                            "minReplicas": {"type": "integer", "minimum": 0},
                            "maxReplicas": {"type": "integer", "minimum": 1},
                            "model": {
                                "type": "object",
                                "required": ["modelFormat"],
                                "properties": {
                                    "modelFormat": {
                                        "type": "object",
                                        "required": ["name"],
                                        "properties": {"name": {"type": "string"}, "version": {"type": "string"}},
                                    },
                                    "runtime": {"type": "string"},
                                    "protocolVersion": {"enum": _PROTOCOLS},
                                    "storageUri": {"type": "string", "pattern": r"^(pvc|s3|gs|https?|hdfs|oci)://"},
                                },
                            },
                        },
                    }
                },
            },
        },
    },
    # KEDA keda.sh/v1alpha1 ScaledObject with prometheus triggers (scaler metadata: serverAddress, query, threshold)
    ("keda.sh/v1alpha1", "ScaledObject"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["scaleTargetRef", "triggers"],
                "properties": {
                    "scaleTargetRef": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {"name": {"type": "string"}, "kind": {"type": "string"}},
                    },
                    "minReplicaCount": {"type": "integer", "minimum": 0},
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "pollingInterval": {"type": "integer", "minimum": 1},
                    "cooldownPeriod": {"type": "integer", "minimum": 0},
                    "triggers": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["type", "metadata"],
                            "properties": {
                                "type": {"const": "prometheus"},
                                "name": {"type": "string"},
                                "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                                "metadata": {
                                    "type": "object",
                                    "required": ["serverAddress", "query", "threshold"],
                                    # KEDA reads every metadata value as a string: a bare number fails there
                                    "additionalProperties": {"type": "string"},
                                    "properties": {"threshold": {"type": "string", "pattern": r"^[0-9.]+$"}},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


@pytest.mark.parametrize("item", CUSTOM, ids=ident)
def test_custom_resources_have_the_fields_their_controllers_require(item: tuple[Path, dict[str, Any]]) -> None:
    _, doc = item
    schema = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    assert schema is not None, f"{ident(item)}: no schema for {doc['apiVersion']} {doc['kind']}"
    jsonschema.validate(doc, schema)


def test_every_kind_of_custom_resource_is_present_and_checked() -> None:
    assert {(d["apiVersion"], d["kind"]) for _, d in CUSTOM} == set(CRD_SCHEMAS)


# ---- the objects agree with each other


def test_kustomizations_list_existing_files_and_every_manifest_is_listed() -> None:
    listed: set[Path] = set()
    for kustomization in KUBERNETES.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text())
        assert spec["kind"] == "Kustomization"
        for resource in spec["resources"]:
            path = (kustomization.parent / resource).resolve()
            assert path.exists(), f"{kustomization.relative_to(ROOT)} lists {resource}, which does not exist"
            if path.is_file():
                listed.add(path)
    manifests = {p.resolve() for p in KUBERNETES.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert manifests - listed == set(), "manifests no kustomization lists"


def test_services_budget_and_autoscalers_select_the_deployment() -> None:
    deployment = one("Deployment", "ferry")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    port_names = {p["name"]: p["containerPort"] for p in containers(deployment)[0]["ports"]}
    for name in ("ferry", "ferry-headless"):
        service = one("Service", name)
        assert service["spec"]["selector"].items() <= labels.items(), name
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"Service {name} targets port {port['targetPort']}"
            assert port["port"] == port_names[port["targetPort"]]
    assert one("Service", "ferry-headless")["spec"]["clusterIP"] == "None"
    assert one("PodDisruptionBudget", "ferry")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert one("HorizontalPodAutoscaler", "ferry")["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "ferry",
    }
    assert one("ScaledObject", "ferry")["spec"]["scaleTargetRef"]["name"] == "ferry"
    claims = [v["persistentVolumeClaim"]["claimName"] for v in deployment["spec"]["template"]["spec"]["volumes"]]
    assert claims == [one("PersistentVolumeClaim")["metadata"]["name"]]


def test_grpc_ports_are_h2c() -> None:
    """A gRPC port says it speaks HTTP/2 without TLS, so meshes and gateways do not treat it as HTTP/1.1."""
    for name in ("ferry", "ferry-headless"):
        (grpc_port,) = [p for p in one("Service", name)["spec"]["ports"] if p["name"] == "grpc"]
        assert grpc_port["appProtocol"] == "kubernetes.io/h2c"
    runtime = one("ClusterServingRuntime")
    assert [p["name"] for p in containers(runtime)[0]["ports"]] == ["h2c"]


def test_the_hpa_asks_for_the_metrics_the_adapter_serves() -> None:
    rules = yaml.safe_load(one("ConfigMap", "prometheus-adapter-ferry")["data"]["config.yaml"])["rules"]
    served = {rule["name"]["as"] for rule in rules}
    asked = {m["pods"]["metric"]["name"] for m in one("HorizontalPodAutoscaler", "ferry")["spec"]["metrics"]}
    assert asked <= served, f"the HPA asks for {asked - served}, which no prometheus-adapter rule serves"


def test_kserve_runtime_serves_onnx_over_both_v2_protocols_from_mnt_models() -> None:
    runtime = one("ClusterServingRuntime")
    assert {"name": "onnx", "version": "1", "autoSelect": True} in runtime["spec"]["supportedModelFormats"]
    assert set(runtime["spec"]["protocolVersions"]) == {"v2", "grpc-v2"}
    args = flag_values(containers(runtime)[0]["args"])
    assert args["--model-repository"] == "/mnt/models"
    service = one("InferenceService")
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]


def test_images_are_the_version_the_build_makes() -> None:
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert version
    for path, doc in DOCS:
        for container in containers(doc):
            assert container["image"] == f"localhost/ferry:{version.group(1)}", f"{path.name}: {container['image']}"


# ---- drift against the server


def test_every_flag_in_the_manifests_exists_in_ferry_serve_help() -> None:
    known = help_flags()
    missing: dict[str, list[str]] = {}
    for path, doc in DOCS:
        for container in containers(doc):
            for flag in flag_values(container.get("args", [])):
                if flag not in known:
                    missing.setdefault(flag, []).append(str(path.relative_to(ROOT)))
    assert not missing, "flags the manifests pass that `ferry serve --help` does not know: " + "; ".join(
        f"{flag} (in {', '.join(sorted(set(files)))})" for flag, files in sorted(missing.items())
    )


@pytest.mark.parametrize("kind", ["Deployment", "ClusterServingRuntime"])
def test_ports_are_the_servers_and_every_probe_uses_them(kind: str) -> None:
    (container,) = containers(one(kind))
    args = flag_values(container["args"])
    grpc_port = int(args.get("--grpc-port") or help_default("--grpc-port"))
    http_port = int(args.get("--http-port") or help_default("--http-port"))
    assert (grpc_port, http_port) == (int(help_default("--grpc-port")), int(help_default("--http-port")))
    assert args["--host"] == "0.0.0.0", "the server must listen beyond the pod's loopback"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports.get("grpc", ports.get("h2c")) == grpc_port
    assert ports.get("http", http_port) == http_port
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(probe_name)
        if probe is None:
            assert kind == "ClusterServingRuntime", f"the Deployment needs a {probe_name}"
            continue
        if "grpc" in probe:
            assert probe["grpc"]["port"] == grpc_port, probe_name
            # tests/integration/test_deploy.py asks a live server's health service for this name
            assert probe["grpc"].get("service", "") == "", probe_name
        else:
            port = probe["httpGet"]["port"]
            assert ports.get(port, port) == http_port, probe_name


def test_readiness_and_startup_use_grpc_health_and_liveness_never_fails_while_draining() -> None:
    (container,) = containers(one("Deployment"))
    assert "grpc" in container["startupProbe"] and "grpc" in container["readinessProbe"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "model loads need minutes, not seconds"


def test_grace_period_covers_prestop_drain_and_grace() -> None:
    pod = one("Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    args = flag_values(container["args"])
    drain = float(args["--drain-delay-s"] or 0)
    grace = float(args["--shutdown-grace-s"] or help_default("--shutdown-grace-s"))
    assert pod["terminationGracePeriodSeconds"] == float(command[1]) + drain + grace + MARGIN_S
    # a connection's age grace must fit in the shutdown grace, or a drain cuts calls its GOAWAY let run
    assert float(args["--max-connection-age-grace-s"] or 0) <= grace


# ---- the Containerfile


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Containerfile, continuation lines joined, comments dropped."""
    lines: list[tuple[str, str]] = []
    pending = ""
    for raw in CONTAINERFILE.read_text().splitlines():
        if raw.lstrip().startswith("#") and not pending:
            continue
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if line:
            word, _, rest = line.partition(" ")
            lines.append((word.upper(), rest.strip()))
    return lines


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def last(word: str) -> str:
    found = [rest for w, rest in final_stage() if w == word]
    assert found, f"the final stage has no {word}"
    return found[-1]


def test_containerfile_runs_ferry_serve_as_a_non_root_user_over_models() -> None:
    user = last("USER").split(":")[0]
    assert user not in ("root", "0"), "the server must not run as root"
    assert json.loads(last("ENTRYPOINT")) == ["ferry", "serve"]
    cmd = flag_values(json.loads(last("CMD")))
    assert cmd["--model-repository"] == "/models"
    assert cmd["--host"] == "0.0.0.0"
    assert set(cmd) <= help_flags()
    # the numeric user the Kubernetes manifests run as (runAsNonRoot needs a numeric USER to verify)
    assert one("Deployment")["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(user)


def test_containerfile_exposes_the_servers_default_ports() -> None:
    exposed = {int(p) for _, rest in final_stage() if _ == "EXPOSE" for p in rest.split()}
    assert exposed == {int(help_default("--grpc-port")), int(help_default("--http-port"))}


def test_containerfile_health_check_asks_the_readiness_route_on_the_http_port() -> None:
    check = last("HEALTHCHECK")
    options, _, command = check.partition("CMD ")
    argv = json.loads(command)
    assert argv[:2] == ["python3", "-c"], "the check runs with what the image has (no curl)"
    assert f"http://127.0.0.1:{help_default('--http-port')}/v2/health/ready" in argv[2]
    assert "--start-period" in options  # model loading is not a failure


def test_containerfile_bakes_the_numba_cache_as_the_serving_user() -> None:
    env = " ".join(rest for word, rest in final_stage() if word == "ENV")
    cache = re.search(r"NUMBA_CACHE_DIR=(\S+)", env)
    assert cache, "NUMBA_CACHE_DIR is not set in the image"
    steps = final_stage()
    user_at = max(i for i, (word, _) in enumerate(steps) if word == "USER")
    warm = [i for i, (word, rest) in enumerate(steps) if word == "RUN" and "warm_numba.py" in rest]
    assert warm and warm[0] > user_at, "the cache must be written by the user that reads it"
    assert (ROOT / "deploy" / "container" / "warm_numba.py").exists()


def test_container_ignore_files_agree() -> None:
    def patterns(name: str) -> list[str]:
        lines = (ROOT / name).read_text().splitlines()
        return [line for line in lines if line and not line.startswith("#")]

    assert patterns(".containerignore") == patterns(".dockerignore")
    # the build context holds every folder the packages install from
    kept = {p[1:].rstrip("/") for p in patterns(".containerignore") if p.startswith("!")}
    assert {"client", "server", "kernels", "loadtest", "ferry", "pyproject.toml", "README.md"} <= kept


def test_build_script_is_posix_sh() -> None:
    for script in ("build.sh", "podman-flags.sh"):
        path = ROOT / "deploy" / "container" / script
        subprocess.run(["sh", "-n", str(path)], check=True, timeout=30)
        assert shlex.split(path.read_text().splitlines()[0]) == ["#!/bin/sh"]
