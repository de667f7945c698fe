"""The deployment files: the Dockerfile, the Compose stack, the Kubernetes manifests, the samples.

No container engine or cluster is needed: every file is parsed and cross-checked against the
others and against the gateway's defaults, the sample settings and policies go through the
gateway's own loaders, the image's HEALTHCHECK command runs against local HTTP servers, and
amtool checks the Alertmanager config. `docker compose config` runs where a Compose client is
installed, and is skipped (the only skip here) where it is not.
"""

from __future__ import annotations

import http.server
import ipaddress
import json
import os
import posixpath
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.alerts.sinks import AlertmanagerSink
from gateway.config import PARSERS, Settings, load_settings
from gateway.credentials import SECRET_FILES
from gateway.policy import load_rules
from gateway.policy.selftest import run_rule_tests
from tests.debian_tools import require
from tests.redis_fixtures import free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "docker-compose.yml"
ALERTMANAGER = DEPLOY / "alertmanager" / "alertmanager.yml"
TEAM_POLICIES = DEPLOY / "gateway" / "policies"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
GRAFANA_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "policy-gateway.yaml"
GRAFANA_DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
NAMESPACE = "ai-policy-gateway"
# Manifests that `kubectl apply -k deploy/k8s` leaves out, and why.
OPTIONAL_MANIFESTS = {"servicemonitor.yaml": "ServiceMonitor"}
# Memory one gateway worker is sized for, and what the master of --workers N adds.
WORKER_MEMORY = 150 * 2**20
MASTER_MEMORY = 64 * 2**20
# What the operator exports before `docker compose up` (deploy/README.md).
COMPOSE_SHELL = {"GATEWAY_ADMIN_TOKEN": "compose-admin-token-0123456789abcdef"}
# After shutdown_timeout, the master of --workers waits this much longer for the flush
# (gateway/workers.py); a single process's flush is bounded within it too.
FLUSH_BOUND = 10


# -- helpers -------------------------------------------------------------------------------


def yaml_documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def k8s_files() -> list[Path]:
    return sorted(path for path in K8S.glob("*.yaml") if path.name != "kustomization.yaml")


def k8s_objects() -> list[dict[str, Any]]:
    return [doc for path in k8s_files() for doc in yaml_documents(path)]


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    found = [o for o in k8s_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name} in deploy/k8s, found {len(found)}"
    return found[0]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def gateway_container() -> dict[str, Any]:
    container: dict[str, Any]
    (container,) = pod_spec(k8s_object("Deployment", "gateway"))["containers"]
    return container


def secret_value(name: str, key: str) -> str:
    secret = k8s_object("Secret", name)
    value: str = {**secret.get("stringData", {})}[key]
    return value


def k8s_environment(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment, values from Secrets and ConfigMaps looked up in deploy/k8s."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        elif "secretKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secret_value(ref["name"], ref["key"])
        else:
            ref = item["valueFrom"]["configMapKeyRef"]
            env[item["name"]] = k8s_object("ConfigMap", ref["name"])["data"][ref["key"]]
    return env


def container_flags(container: dict[str, Any]) -> dict[str, str]:
    """The container's args (flags of `gateway serve`, ``--name=value`` or ``--name value``) by setting."""
    args, flags = list(container.get("args", [])), {}
    while args:
        name, given, value = args.pop(0).partition("=")
        assert name.startswith("--"), name
        flags[name[2:].replace("-", "_")] = value if given else args.pop(0)
    assert set(flags) <= set(PARSERS), flags
    return flags


def secret_behind(path: str) -> tuple[str, str]:
    """The (Secret, key) whose value the gateway container reads as the file ``path``."""
    (mount,) = [
        m for m in gateway_container()["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert "subPath" not in mount, f"{path}: a subPath mount never sees the Secret's updates"
    (volume,) = [
        v for v in pod_spec(k8s_object("Deployment", "gateway"))["volumes"] if v["name"] == mount["name"]
    ]
    relative = posixpath.relpath(path, mount["mountPath"])
    if "projected" in volume:
        sources = [
            (s["secret"]["name"], s["secret"]) for s in volume["projected"]["sources"] if "secret" in s
        ]
    else:
        sources = [(volume["secret"]["secretName"], volume["secret"])]
    found = [
        (name, item["key"])
        for name, source in sources
        for item in source.get("items") or [{"key": key, "path": key} for key in secret_keys(name)]
        if item["path"] == relative
    ]
    assert len(found) == 1, f"{path} is not one key of a Secret volume: {found}"
    return found[0]


def secret_keys(name: str) -> list[str]:
    return list(k8s_object("Secret", name).get("stringData", {}))


def config_map_mounted_at(directory: str) -> dict[str, Any]:
    """The ConfigMap mounted (as a whole directory) at ``directory`` in the gateway container."""
    (mount,) = [m for m in gateway_container()["volumeMounts"] if m["mountPath"] == directory]
    assert "subPath" not in mount, f"{directory}: a subPath mount never sees the ConfigMap's updates"
    (volume,) = [
        v for v in pod_spec(k8s_object("Deployment", "gateway"))["volumes"] if v["name"] == mount["name"]
    ]
    return k8s_object("ConfigMap", volume["configMap"]["name"])


def quantity(value: object) -> float:
    """A Kubernetes quantity (``384Mi``, ``1Gi``, ``500m``, ``2``) as a number of bytes or cores."""
    text = str(value)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return data


def compose_service(name: str) -> dict[str, Any]:
    service: dict[str, Any] = compose()["services"][name]
    return service


def interpolate(value: object, shell: dict[str, str] | None = None) -> str:
    """Compose's ``${VAR:-default}``, ``${VAR}`` and ``${VAR:?error}``, with only ``shell`` set
    (by default: the variables deploy/README.md tells the operator to export)."""
    shell = COMPOSE_SHELL if shell is None else shell

    def value_of(match: re.Match[str]) -> str:
        name, operator, text = match.group(1), match.group(2) or "", match.group(3) or ""
        if name in shell:
            return shell[name]
        if operator.endswith("?"):
            raise AssertionError(f"Compose refuses to start without {name}: {text}")
        return text

    pattern = r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}"
    return re.sub(pattern, value_of, str(value))


def compose_environment(service: dict[str, Any], shell: dict[str, str] | None = None) -> dict[str, str]:
    raw = service.get("environment", {})
    pairs = raw.items() if isinstance(raw, dict) else (item.split("=", 1) for item in raw)
    return {str(key): interpolate(value, shell) for key, value in pairs}


def compose_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each volume of a service; a relative source is resolved against deploy/."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            source, target = volume.get("source", ""), volume["target"]
        else:
            source, target = volume.split(":")[:2]
        if source.startswith("."):
            source = str((DEPLOY / source).resolve())
        mounts.append((source, target))
    return mounts


def host_path_of(service: dict[str, Any], container_path: str) -> Path:
    """The host path a service sees at ``container_path`` (a bind mount of it or of a parent)."""
    for source, target in compose_mounts(service):
        if source.startswith("/") and (container_path == target or container_path.startswith(target + "/")):
            return Path(source) / posixpath.relpath(container_path, target)
    raise AssertionError(f"nothing is mounted at {container_path}")


def flag_value(command: list[str], flag: str) -> str:
    (value,) = [arg.split("=", 1)[1] for arg in command if arg.startswith(flag + "=")]
    return value


def dockerfile() -> Path:
    build = compose_service("gateway")["build"]
    return (DEPLOY / str(build["context"]) / str(build.get("dockerfile", "Dockerfile"))).resolve()


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    lines = [
        line for line in dockerfile().read_text(encoding="utf-8").splitlines() if not line.startswith("#")
    ]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [
        (parts[0].upper(), parts[1].strip() if len(parts) > 1 else "")
        for parts in (line.strip().split(None, 1) for line in joined.splitlines() if line.strip())
    ]


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (name, _) in enumerate(instructions) if name == "FROM")
    return instructions[last_from:]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for name, args in final_stage():
        if name == "ENV":
            env.update(pair.split("=", 1) for pair in re.findall(r'\S+=(?:"[^"]*"|\S+)', args))
    return {key: value.strip('"') for key, value in env.items()}


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(re-include?, pattern) of .dockerignore at the build context, with Docker's matching rules."""
    context = dockerfile().parent
    rules = []
    lines = (line.strip() for line in (context / ".dockerignore").read_text(encoding="utf-8").splitlines())
    for line in lines:
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = posixpath.normpath(line.lstrip("!").strip()).lstrip("/")
        regex, i = "", 0
        while i < len(pattern):
            char = pattern[i]
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
                continue
            if pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
                continue
            if char == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i : end + 1], end + 1
                continue
            regex += {"*": "[^/]*", "?": "[^/]"}.get(char, re.escape(char))
            i += 1
        rules.append((negated, re.compile(regex + r"\Z")))
    return rules


def ignored(relative: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether the build context leaves ``relative`` out: the last rule matching it or a parent wins."""
    parts = relative.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for negated, regex in rules:
        if any(regex.match(candidate) for candidate in candidates):
            result = not negated
    return result


# -- every file ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")]),
    ids=lambda path: str(path.relative_to(DEPLOY)),
)
def test_every_yaml_file_under_deploy_parses(path: Path) -> None:
    """Each YAML file under deploy/ parses (every document of a multi-document file) and is not empty."""
    assert yaml_documents(path), f"{path} holds no document"


def test_deploy_readme_describes_every_file() -> None:
    """deploy/README.md names every file it is meant to explain."""
    readme = (DEPLOY / "README.md").read_text(encoding="utf-8")
    files = [
        *K8S.glob("*.yaml"),
        COMPOSE,
        ALERTMANAGER,
        DEPLOY / "gateway" / "gateway.yaml",
        *TEAM_POLICIES.glob("*.yaml"),
        dockerfile(),
    ]
    missing = [path.name for path in files if path.name not in readme]
    assert not missing, f"deploy/README.md does not mention {missing}"


# -- Kubernetes ------------------------------------------------------------------------------


def test_k8s_objects_have_api_version_kind_name_and_namespace() -> None:
    """Every object has apiVersion, kind and metadata.name, and lives in the gateway's namespace."""
    objects = k8s_objects()
    assert objects
    for obj in objects:
        assert isinstance(obj.get("apiVersion"), str), obj
        assert isinstance(obj.get("kind"), str), obj
        assert obj.get("metadata", {}).get("name"), obj
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == NAMESPACE, f"{obj['kind']} {obj['metadata']['name']}"
    assert k8s_object("Namespace", NAMESPACE)


def test_kustomization_lists_every_manifest_but_the_optional_ones() -> None:
    """`kubectl apply -k deploy/k8s` applies every manifest except those that need CRDs."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["namespace"] == NAMESPACE
    listed = set(kustomization["resources"])
    assert all((K8S / name).is_file() for name in listed), listed
    assert listed == {path.name for path in k8s_files()} - set(OPTIONAL_MANIFESTS)
    for name, kind in OPTIONAL_MANIFESTS.items():
        assert [doc["kind"] for doc in yaml_documents(K8S / name)] == [kind]
    # The image it rewrites is the one the Deployment names.
    (image,) = kustomization["images"]
    assert gateway_container()["image"].split(":")[0] == image["name"]


def test_deployment_probes_ask_the_admin_port() -> None:
    """Readiness asks /readyz and liveness /healthz, both on the admin port; the ports are the gateway's."""
    container = gateway_container()
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    env = k8s_environment(container)
    assert ports["http"] == int(env.get("GATEWAY_PORT", Settings().port))
    assert ports["admin"] == int(env.get("GATEWAY_ADMIN_PORT", Settings().admin_port))
    expected = {"readinessProbe": "/readyz", "livenessProbe": "/healthz", "startupProbe": "/healthz"}
    for probe, path in expected.items():
        if probe == "startupProbe" and probe not in container:
            continue
        check = container[probe]["httpGet"]
        assert check["path"] == path, probe
        assert ports.get(check["port"], check["port"]) == ports["admin"], probe


def test_deployment_resources_fit_its_workers() -> None:
    """Requests and limits are set; the memory limit holds ~150 MiB a worker (plus the master)."""
    container = gateway_container()
    resources = container["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind]), kind
    assert quantity(resources["requests"]["memory"]) <= quantity(resources["limits"]["memory"])
    assert quantity(resources["requests"]["cpu"]) <= quantity(resources["limits"]["cpu"])
    workers = int(k8s_environment(container).get("GATEWAY_WORKERS", "1"))
    needed = WORKER_MEMORY * workers + (MASTER_MEMORY if workers > 1 else 0)
    assert quantity(resources["limits"]["memory"]) >= needed, f"{workers} workers need {needed} bytes"


def pod_templates() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{o['kind']} {o['metadata']['name']}", pod_spec(o))
        for o in k8s_objects()
        if o["kind"] in {"Deployment", "StatefulSet", "DaemonSet"}
    ]


@pytest.mark.parametrize("name", [name for name, _ in pod_templates()])
def test_pods_meet_the_restricted_pod_security_standard(name: str) -> None:
    """Non-root, no privilege escalation, no capabilities, seccomp, read-only root filesystem."""
    spec = dict(pod_templates())[name]
    pod = spec.get("securityContext", {})
    assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault"
    for container in spec["containers"]:
        context = {**pod, **container.get("securityContext", {})}
        assert context.get("runAsNonRoot") is True, container["name"]
        assert context.get("runAsUser", 1) != 0, container["name"]
        assert context.get("allowPrivilegeEscalation") is False, container["name"]
        assert context.get("readOnlyRootFilesystem") is True, container["name"]
        assert context.get("capabilities", {}).get("drop") == ["ALL"], container["name"]


def test_service_links_do_not_collide_with_the_gateway_settings() -> None:
    """Service links are off: a Service named gateway(-admin) would inject GATEWAY_PORT=tcp://..."""
    services = [o["metadata"]["name"] for o in k8s_objects() if o["kind"] == "Service"]
    # Kubernetes' variables for a Service: NAME_SERVICE_HOST, NAME_PORT, NAME_PORT_<port>_TCP, ...
    prefixes = [name.upper().replace("-", "_") + "_" for name in services]
    settings = [f"GATEWAY_{name.upper()}" for name in PARSERS]
    assert any(setting.startswith(prefix) for setting in settings for prefix in prefixes)
    assert pod_spec(k8s_object("Deployment", "gateway")).get("enableServiceLinks") is False


def test_deployment_runs_as_the_image_user_with_a_writable_tmp() -> None:
    """runAsUser is the Dockerfile's USER; /tmp (--workers' metrics files) is an emptyDir."""
    spec = pod_spec(k8s_object("Deployment", "gateway"))
    (user,) = [args for name, args in final_stage() if name == "USER"]
    assert spec["securityContext"]["runAsUser"] == int(user.split(":")[0])
    assert spec["securityContext"]["runAsNonRoot"] is True
    (mount,) = [m for m in gateway_container()["volumeMounts"] if m["mountPath"] == "/tmp"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" in volume
    assert not mount.get("readOnly", False)


def k8s_settings(tmp_path: Path) -> Settings:
    """The settings a gateway pod starts with: its flags over its environment over its config
    file, the files its flags name holding the values of the Secret keys mounted there."""
    container = gateway_container()
    env = k8s_environment(container)
    directory, name = posixpath.split(env["GATEWAY_CONFIG"])
    config = tmp_path / name
    config.write_text(config_map_mounted_at(directory)["data"][name], encoding="utf-8")
    flags: dict[str, object] = {**container_flags(container)}
    for setting in SECRET_FILES.values():
        if setting in flags:
            local = tmp_path / setting
            local.write_text(secret_value(*secret_behind(str(flags[setting]))), encoding="utf-8")
            flags[setting] = local
    return load_settings(flags, env, config)


def test_deployment_drains_before_it_is_killed(tmp_path: Path) -> None:
    """3 replicas; a preStop sleep; the grace period outlasts it plus the gateway's shutdown bound."""
    deployment = k8s_object("Deployment", "gateway")
    assert deployment["spec"]["replicas"] == 3
    pre_stop = gateway_container()["lifecycle"]["preStop"]
    sleep = int(pre_stop["sleep"]["seconds"]) if "sleep" in pre_stop else int(pre_stop["exec"]["command"][-1])
    assert pre_stop.get("exec", {}).get("command", ["sleep"])[0] == "sleep"
    assert sleep >= 5
    bound = k8s_settings(tmp_path).shutdown_timeout + FLUSH_BOUND
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] > sleep + bound


def test_deployment_settings_are_accepted(tmp_path: Path) -> None:
    """gateway-config's gateway.yaml loads alone and under the pod's environment; the wiring holds."""
    env = k8s_environment(gateway_container())
    directory, name = posixpath.split(env["GATEWAY_CONFIG"])
    text = config_map_mounted_at(directory)["data"][name]
    config = tmp_path / name
    config.write_text(text, encoding="utf-8")
    load_settings({}, {}, config)
    settings = k8s_settings(tmp_path)
    assert settings.redis_url is not None
    assert settings.audit_key is not None
    assert settings.workers == int(env["GATEWAY_WORKERS"])
    assert str(settings.policies[0]) == "builtin"
    assert settings.watch_policies
    assert settings.alerts.sinks


def test_policy_config_maps_load_over_the_shipped_pack(tmp_path: Path) -> None:
    """Each directory of GATEWAY_POLICIES after `builtin` is a ConfigMap the loader accepts over the pack."""
    env = k8s_environment(gateway_container())
    directories = env["GATEWAY_POLICIES"].split(":")
    assert directories[0] == "builtin"
    assert directories[1:], "no team directory layered over the shipped pack"
    for index, directory in enumerate(directories[1:]):
        config_map = config_map_mounted_at(directory)
        files = {key: value for key, value in config_map["data"].items() if key.endswith((".yaml", ".yml"))}
        assert files, config_map["metadata"]["name"]
        team = tmp_path / f"team-{index}"
        team.mkdir()
        for key, value in files.items():
            (team / key).write_text(value, encoding="utf-8")
        rules, _ = load_rules([Path("builtin"), team])
        report = run_rule_tests(rules)
        assert not report.failures, [failure.describe() for failure in report.failures]


def test_the_compose_and_k8s_team_policies_are_the_same() -> None:
    """deploy/gateway/policies/team.yaml and the gateway-policies ConfigMap hold the same policies."""
    data = k8s_object("ConfigMap", "gateway-policies")["data"]
    for path in TEAM_POLICIES.glob("*.yaml"):
        assert yaml.safe_load(data[path.name]) == yaml.safe_load(path.read_text(encoding="utf-8")), path.name


def test_redis_url_comes_from_the_secret_and_names_the_redis_service() -> None:
    """REDIS_URL is a secretKeyRef; it points at the Redis Service with the password Redis is given."""
    (item,) = [e for e in gateway_container()["env"] if e["name"] == "REDIS_URL"]
    ref = item["valueFrom"]["secretKeyRef"]
    url = urlsplit(PARSERS["redis_url"](secret_value(ref["name"], ref["key"])))
    service = k8s_object("Service", "redis")
    assert url.scheme == "redis"
    assert url.hostname in {
        "redis",
        f"redis.{NAMESPACE}",
        f"redis.{NAMESPACE}.svc",
        f"redis.{NAMESPACE}.svc.cluster.local",
    }
    assert url.port == service["spec"]["ports"][0]["port"]
    redis = k8s_object("StatefulSet", "redis")
    (container,) = pod_spec(redis)["containers"]
    (password,) = [e for e in container["env"] if e["name"] == "REDIS_PASSWORD"]
    password_ref = password["valueFrom"]["secretKeyRef"]
    assert url.password == secret_value(password_ref["name"], password_ref["key"])
    assert "$(REDIS_PASSWORD)" in container["args"]


def test_redis_persists_its_data() -> None:
    """One Redis, append-only, its /data on a PersistentVolumeClaim; the Service selects it."""
    redis = k8s_object("StatefulSet", "redis")
    assert redis["spec"]["replicas"] == 1
    (container,) = pod_spec(redis)["containers"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    assert mount["mountPath"] == "/data"
    labels = redis["spec"]["template"]["metadata"]["labels"]
    service = k8s_object("Service", "redis")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] in {p["name"] for p in container["ports"]}


def test_services_select_the_gateway_pods() -> None:
    """`gateway` serves the proxy port, `gateway-admin` the admin port, both on the gateway's pods."""
    deployment = k8s_object("Deployment", "gateway")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {port["name"]: port["containerPort"] for port in gateway_container()["ports"]}
    for name, port_name in (("gateway", "http"), ("gateway-admin", "admin")):
        service = k8s_object("Service", name)
        assert service["spec"]["selector"].items() <= labels.items(), name
        (port,) = service["spec"]["ports"]
        assert port["targetPort"] == port_name, name
        assert port["port"] == ports[port_name], name
    monitor = k8s_object("ServiceMonitor", "gateway")
    admin_labels = k8s_object("Service", "gateway-admin")["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= admin_labels.items()
    assert [endpoint["port"] for endpoint in monitor["spec"]["endpoints"]] == ["admin"]


def test_autoscaler_and_disruption_budget_cover_the_deployment() -> None:
    """The HPA scales the Deployment on CPU (which has a CPU request); the PDB allows one pod down."""
    hpa = k8s_object("HorizontalPodAutoscaler", "gateway")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway"}
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"] == ["cpu"]
    assert quantity(gateway_container()["resources"]["requests"]["cpu"]) > 0
    pdb = k8s_object("PodDisruptionBudget", "gateway")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"].get("maxUnavailable") == 1 or "minAvailable" in pdb["spec"]
    labels = k8s_object("Deployment", "gateway")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


# -- the admin port and the network ---------------------------------------------------------

MONITORING = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}


def network_policies() -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in k8s_objects() if o["kind"] == "NetworkPolicy"}


def template_labels(kind: str, name: str) -> dict[str, str]:
    labels: dict[str, str] = k8s_object(kind, name)["spec"]["template"]["metadata"]["labels"]
    return labels


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, selector
    matched: bool = selector.get("matchLabels", {}).items() <= labels.items()
    return matched


def policy_ports(rule: dict[str, Any], container: dict[str, Any]) -> set[tuple[str, int]]:
    """(protocol, port) of a rule, a named port resolved against the container's ports."""
    named = {port["name"]: port["containerPort"] for port in container.get("ports", [])}
    return {(port.get("protocol", "TCP"), named.get(port["port"], port["port"])) for port in rule["ports"]}


def test_network_policies_deny_by_default_and_select_the_pods_they_guard() -> None:
    """default-deny covers every pod both ways; `gateway` selects the gateway's pods only, `redis` Redis's."""
    policies = network_policies()
    assert set(policies) == {"default-deny", "gateway", "redis"}
    assert policies["default-deny"]["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    for policy in policies.values():
        assert policy["apiVersion"] == "networking.k8s.io/v1"
    gateway, redis = template_labels("Deployment", "gateway"), template_labels("StatefulSet", "redis")
    for name, labels, other in (("gateway", gateway, redis), ("redis", redis, gateway)):
        selector = policies[name]["spec"]["podSelector"]
        assert selects(selector, labels), name
        assert not selects(selector, other), name
    assert set(policies["gateway"]["spec"]["policyTypes"]) == {"Ingress", "Egress"}


def test_the_admin_port_admits_the_monitoring_namespace_only() -> None:
    """The rule admitting the Deployment's admin port comes from the monitoring namespace only; the
    proxy port has a rule of its own; no rule admits every source or every port."""
    container = gateway_container()
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    admitted: dict[int, list[Any]] = {}
    for rule in network_policies()["gateway"]["spec"]["ingress"]:
        assert rule.get("from"), "an ingress rule without `from` admits every source"
        assert rule.get("ports"), "an ingress rule without `ports` admits every port"
        for protocol, port in policy_ports(rule, container):
            assert protocol == "TCP"
            admitted.setdefault(port, []).extend(rule["from"])
    assert set(admitted) == {ports["admin"], ports["http"]}
    assert admitted[ports["admin"]] == [MONITORING]
    assert MONITORING not in admitted[ports["http"]]
    (service_port,) = k8s_object("Service", "gateway-admin")["spec"]["ports"]
    assert ports[service_port["targetPort"]] == ports["admin"]


def test_the_gateway_reaches_only_dns_redis_alertmanager_and_the_backend(tmp_path: Path) -> None:
    """Egress: DNS to kube-dns, Redis's port to Redis's pods, the Alertmanager sink's port in its
    namespace, and the upstream's port to public addresses only."""
    settings = k8s_settings(tmp_path)
    by_port: dict[tuple[str, int], list[Any]] = {}
    for rule in network_policies()["gateway"]["spec"]["egress"]:
        assert rule.get("to"), "an egress rule without `to` reaches everything"
        assert rule.get("ports"), "an egress rule without `ports` reaches every port"
        for port in policy_ports(rule, {}):
            by_port.setdefault(port, []).extend(rule["to"])
    (redis,) = pod_spec(k8s_object("StatefulSet", "redis"))["containers"]
    (redis_port,) = [port["containerPort"] for port in redis["ports"]]
    sinks = yaml.safe_load(config_map_mounted_at("/etc/gateway/config")["data"]["gateway.yaml"])["alerts"]
    (alertmanager,) = [urlsplit(sink["url"]) for sink in sinks["sinks"] if sink["type"] == "alertmanager"]
    upstream_port = settings.upstream_url.port
    assert set(by_port) == {("UDP", 53), ("TCP", 53), ("TCP", redis_port), ("TCP", alertmanager.port),
                            ("TCP", upstream_port)}  # fmt: skip
    for dns in by_port[("UDP", 53)] + by_port[("TCP", 53)]:
        assert dns["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kube-system"}
    (to_redis,) = by_port[("TCP", redis_port)]
    assert set(to_redis) == {"podSelector"}, "Redis is in the gateway's own namespace"
    assert selects(to_redis["podSelector"], template_labels("StatefulSet", "redis"))
    (to_alertmanager,) = by_port[("TCP", alertmanager.port)]
    namespace = str(alertmanager.hostname).split(".")[1]
    assert to_alertmanager["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": namespace}
    (to_backend,) = by_port[("TCP", upstream_port)]
    block = to_backend["ipBlock"]
    for private in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "127.0.0.0/8"):
        outside = not ipaddress.ip_network(private).overlaps(ipaddress.ip_network(block["cidr"]))
        assert outside or private in block.get("except", []), private


def test_redis_admits_the_gateway_only() -> None:
    """Redis's one ingress rule: its port, from the gateway's pods."""
    (rule,) = network_policies()["redis"]["spec"]["ingress"]
    (source,) = rule["from"]
    assert set(source) == {"podSelector"}
    assert selects(source["podSelector"], template_labels("Deployment", "gateway"))
    (redis,) = pod_spec(k8s_object("StatefulSet", "redis"))["containers"]
    assert policy_ports(rule, redis) == {("TCP", port["containerPort"]) for port in redis["ports"]}


def test_the_deployment_reads_its_admin_token_and_origin_secret_from_secrets(tmp_path: Path) -> None:
    """--admin-token-file and --origin-secret-file name keys of Secret volumes (no subPath, not
    world-readable); the pod starts with those values."""
    flags = container_flags(gateway_container())
    assert secret_behind(flags["admin_token_file"]) == ("gateway-admin-token", "token")
    assert secret_behind(flags["origin_secret_file"]) == ("gateway-secrets", "origin-secret")
    settings = k8s_settings(tmp_path)
    assert settings.admin_token == secret_value("gateway-admin-token", "token")
    assert settings.origin_secret == secret_value("gateway-secrets", "origin-secret")
    for path in (flags["admin_token_file"], flags["origin_secret_file"]):
        (mount,) = [m for m in gateway_container()["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
        assert mount["readOnly"] is True
        (volume,) = [
            v for v in pod_spec(k8s_object("Deployment", "gateway"))["volumes"] if v["name"] == mount["name"]
        ]
        mode = (volume.get("projected") or volume.get("secret") or {}).get("defaultMode", 0o644)
        assert mode & 0o007 == 0, f"{path} is readable by every user of the pod"


def test_prometheus_sends_the_admin_token_when_metrics_ask_for_it(tmp_path: Path) -> None:
    """/metrics is behind the token (workspace labels tell each workspace's use); the ServiceMonitor
    sends the very Secret key the pods read; the probes' paths stay open."""
    settings = k8s_settings(tmp_path)
    assert "metrics" not in settings.admin_open
    (endpoint,) = k8s_object("ServiceMonitor", "gateway")["spec"]["endpoints"]
    authorization = endpoint["authorization"]
    assert authorization.get("type", "Bearer") == "Bearer"
    credentials = authorization["credentials"]
    token_file = container_flags(gateway_container())["admin_token_file"]
    assert (credentials["name"], credentials["key"]) == secret_behind(token_file)
    container = gateway_container()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        path = container[probe]["httpGet"]["path"]
        assert path.strip("/") in settings.admin_open, f"{probe} asks {path}, which wants a token"


# -- Docker Compose --------------------------------------------------------------------------


def test_compose_has_the_stack_and_its_dependencies_exist() -> None:
    """The five services; every depends_on names a service, and service_healthy ones have a healthcheck."""
    services = compose()["services"]
    assert {"gateway", "redis", "prometheus", "alertmanager", "grafana"} <= set(services)
    for name, service in services.items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            if condition.get("condition") == "service_healthy":
                assert "healthcheck" in services[dependency], f"{dependency} has no healthcheck"
    assert services["gateway"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_compose_mounts_exist() -> None:
    """Every host path a service mounts exists; every named volume is declared."""
    declared = set(compose().get("volumes") or {})
    for name, service in compose()["services"].items():
        for source, target in compose_mounts(service):
            if source.startswith("/"):
                assert Path(source).exists(), f"{name}: {source} (mounted at {target}) does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"


def test_compose_builds_the_gateway_from_the_repository() -> None:
    """The build context is the repository root and its Dockerfile exists."""
    build = compose_service("gateway")["build"]
    assert (DEPLOY / build["context"]).resolve() == ROOT
    assert dockerfile().is_file()


def test_compose_gateway_settings_and_policies_are_accepted(tmp_path: Path) -> None:
    """REDIS_URL is redis://redis:6379/0; the mounted config and team policies load; Redis is append-only."""
    gateway = compose_service("gateway")
    env = compose_environment(gateway)
    assert env["REDIS_URL"] == "redis://redis:6379/0"
    config = host_path_of(gateway, env["GATEWAY_CONFIG"])
    assert config.is_file()
    load_settings({}, {}, config)
    settings = load_settings({}, {**dockerfile_env(), **env}, config)
    assert settings.host == settings.admin_host == "0.0.0.0"
    assert [type(sink) for sink in settings.alerts.sinks] == [AlertmanagerSink]
    alerts = yaml.safe_load(config.read_text(encoding="utf-8"))["alerts"]["sinks"]
    (url,) = [s["url"] for s in alerts if s["type"] == "alertmanager"]
    assert urlsplit(url).hostname == "alertmanager"
    assert urlsplit(url).port == 9093
    directories = [host_path_of(gateway, d) for d in env["GATEWAY_POLICIES"].split(":")[1:]]
    assert directories
    rules, _ = load_rules([Path("builtin"), *directories])
    assert not run_rule_tests(rules).failures
    command = compose_service("redis")["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert compose_service("redis")["image"].split(":")[0] == "redis"


def test_compose_shutdown_outlasts_the_gateway_drain() -> None:
    """stop_grace_period covers shutdown_timeout plus the flush (Docker's default is 10 s)."""
    gateway = compose_service("gateway")
    env = compose_environment(gateway)
    settings = load_settings({}, env, host_path_of(gateway, env["GATEWAY_CONFIG"]))
    grace = gateway["stop_grace_period"]
    assert grace.endswith("s")
    assert float(grace[:-1]) > settings.shutdown_timeout + FLUSH_BOUND


def test_compose_admin_port_has_a_token_and_prometheus_scrapes_accordingly() -> None:
    """Compose refuses to start without GATEWAY_ADMIN_TOKEN; with it the gateway's admin port (all
    interfaces, published on loopback) has a token, and the scrape job sends credentials exactly
    when /metrics asks for them."""
    gateway = compose_service("gateway")
    with pytest.raises(AssertionError, match="GATEWAY_ADMIN_TOKEN"):
        compose_environment(gateway, shell={})
    env = compose_environment(gateway)
    settings = load_settings({}, {**dockerfile_env(), **env}, host_path_of(gateway, env["GATEWAY_CONFIG"]))
    assert settings.admin_host == "0.0.0.0"
    assert settings.admin_token == COMPOSE_SHELL["GATEWAY_ADMIN_TOKEN"]
    published = [str(port) for port in gateway["ports"] if str(port).endswith(f":{settings.admin_port}")]
    assert published
    assert all(port.startswith("127.0.0.1:") for port in published), published
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "policy-gateway"]
    if "metrics" in settings.admin_open:
        assert "authorization" not in job
    else:
        credentials = job["authorization"]["credentials_file"]
        host_path_of(compose_service("prometheus"), credentials)


def test_compose_monitoring_mounts_match_the_configs() -> None:
    """Prometheus, Alertmanager and Grafana see their files where their configs say, at the right hosts."""
    services = compose()["services"]
    prometheus = services["prometheus"]
    config_path = flag_value(prometheus["command"], "--config.file")
    assert host_path_of(prometheus, config_path) == PROMETHEUS_CONFIG
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    for rule_file in config["rule_files"]:
        mounted = host_path_of(prometheus, posixpath.join(posixpath.dirname(config_path), rule_file))
        assert mounted == PROMETHEUS_CONFIG.parent / rule_file
    targets = [
        target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    ]
    targets += [
        t for m in config["alerting"]["alertmanagers"] for s in m["static_configs"] for t in s["targets"]
    ]
    for target in targets:
        assert target.split(":")[0] in services, target
    assert f"gateway:{Settings().admin_port}" in targets

    alertmanager = services["alertmanager"]
    assert host_path_of(alertmanager, flag_value(alertmanager["command"], "--config.file")) == ALERTMANAGER

    grafana = services["grafana"]
    for kind in ("datasources", "dashboards"):
        directory = host_path_of(grafana, f"/etc/grafana/provisioning/{kind}")
        assert directory == DEPLOY / "grafana" / "provisioning" / kind
    (provider,) = yaml.safe_load(GRAFANA_PROVIDERS.read_text(encoding="utf-8"))["providers"]
    dashboards = host_path_of(grafana, provider["options"]["path"])
    assert (dashboards / "policy-gateway.json").is_file()
    (source,) = yaml.safe_load(GRAFANA_DATASOURCES.read_text(encoding="utf-8"))["datasources"]
    assert urlsplit(source["url"]).hostname in services


def test_docker_compose_accepts_the_file() -> None:
    """`docker compose config` accepts the file (where a Compose client is installed)."""
    docker = shutil.which("docker")
    found = docker is not None and (
        subprocess.run(
            [docker, "compose", "version"], capture_output=True, timeout=30, check=False
        ).returncode
        == 0
    )
    if not found or docker is None:
        pytest.skip(
            "no Docker Compose client here (`docker compose version` fails): "
            "cannot run `docker compose config`"
        )
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# -- the image -------------------------------------------------------------------------------


def test_dockerfile_builds_a_slim_non_root_image_of_the_package() -> None:
    """Slim Python >= 3.11, `pip install .`, a numeric non-root USER, HEALTHCHECK, EXPOSE, ENTRYPOINT."""
    instructions = dockerfile_instructions()
    args = dict(
        arg.split("=", 1)
        for name, arg in instructions[: [n for n, _ in instructions].index("FROM")]
        if name == "ARG"
    )
    bases = [
        re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], a.split()[0])
        for n, a in instructions
        if n == "FROM"
    ]
    for base in bases:
        match = re.fullmatch(r"python:3\.(\d+)-slim(?:-\w+)?", base)
        assert match, base
        assert int(match.group(1)) >= 11, base
    runs = " ".join(arg for name, arg in instructions if name == "RUN")
    assert re.search(r"pip install (?:[^&;]* )?\.(?:\s|$)", runs), "the package is not pip-installed"
    stage = final_stage()
    users = [arg for name, arg in stage if name == "USER"]
    assert users, "no USER: the image would run as root"
    user = users[-1].split(":")[0]
    assert user.isdigit(), "a numeric USER lets Kubernetes check runAsNonRoot"
    assert int(user) != 0
    (healthcheck,) = [arg for name, arg in stage if name == "HEALTHCHECK"]
    assert "/healthz" in healthcheck
    (expose,) = [arg for name, arg in stage if name == "EXPOSE"]
    assert set(expose.split()) == {str(Settings().port), str(Settings().admin_port)}
    env = dockerfile_env()
    assert env["GATEWAY_HOST"] == env["GATEWAY_ADMIN_HOST"] == "0.0.0.0"
    (entrypoint,) = [arg for name, arg in stage if name == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["gateway", "serve"]


def test_build_context_holds_the_package_and_nothing_else() -> None:
    """What the Dockerfile copies exists and is kept by .dockerignore; the venv, .git, tests are left out."""
    context = dockerfile().parent
    rules = dockerignore_rules()
    sources = [
        source
        for name, arg in dockerfile_instructions()
        if name == "COPY" and "--from" not in arg
        for source in arg.split()[:-1]
    ]
    assert sources
    for source in sources:
        assert (context / source).exists(), source
        assert not ignored(source.rstrip("/"), rules), f"{source} is copied but .dockerignore leaves it out"
    package = [
        path.relative_to(context).as_posix()
        for path in (context / "gateway").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    ]
    assert any(path.endswith(".yaml") for path in package)
    assert [path for path in package if ignored(path, rules)] == []
    for left_out in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/test_proxy.py",
        "bench/engine.py",
        "gateway/__pycache__/app.cpython-312.pyc",
    ):
        assert ignored(left_out, rules), left_out


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def admin_server() -> Iterator[tuple[int, type[_Health]]]:
    handler = type("Handler", (_Health,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_command_passes_only_on_a_healthy_admin_port(
    admin_server: tuple[int, type[_Health]],
) -> None:
    """The HEALTHCHECK's Python exits 0 on /healthz 200, non-zero on 503 or when nothing listens."""
    (healthcheck,) = [arg for name, arg in final_stage() if name == "HEALTHCHECK"]
    command = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert command[0] == "python"
    # Without GATEWAY_ADMIN_PORT it asks the gateway's default admin port.
    assert re.search(rf"\b{Settings().admin_port}\b", command[-1]), command
    port, handler = admin_server

    def run(admin_port: int) -> int:
        env = {**os.environ, "GATEWAY_ADMIN_PORT": str(admin_port)}
        return subprocess.run(
            [sys.executable, *command[1:]], env=env, capture_output=True, timeout=30, check=False
        ).returncode

    assert run(port) == 0
    handler.status = 503
    assert run(port) != 0
    assert run(free_port()) != 0


# -- Alertmanager ----------------------------------------------------------------------------


def amtool() -> str:
    return require("amtool", "prometheus-alertmanager")


def test_alertmanager_config_is_valid() -> None:
    """amtool check-config accepts deploy/alertmanager/alertmanager.yml."""
    result = subprocess.run(
        [amtool(), "check-config", str(ALERTMANAGER)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_alertmanager_routes_every_alert_to_a_receiver() -> None:
    """The gateway's PolicyViolation and every alert of alerts.yml reach a named receiver, not the default."""
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text(encoding="utf-8"))
    names = ["PolicyViolation", *(rule["alert"] for group in rules["groups"] for rule in group["rules"])]
    routed = {}
    for name in names:
        result = subprocess.run(
            [amtool(), "config", "routes", "test", f"--config.file={ALERTMANAGER}", f"alertname={name}"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        routed[name] = result.stdout.strip()
    assert routed["PolicyViolation"] == "security"
    assert routed["PolicyGatewayDown"] == "oncall"
    assert "default" not in routed.values(), routed
