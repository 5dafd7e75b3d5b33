"""``make chart-test``, second half: what the chart's rendered objects mean, checked against the code.

Run by ``make chart-test`` after ``chart_check.py`` (``HELM`` names the helm binary; make installs it);
not part of ``make test``, which needs no helm.  Checks: one GPU per worker pod (none with the CPU values),
every consumer name from the pod name, probe ports equal to metrics ports, env keys in parity with
compose/diffserve.env and with the services' options, stream and group names equal to
``common.config.Keys`` and the pipeline's groups, secrets only by reference, the autoscaler's target and
metric, and that a deliberately broken field fails the check."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chart_check as C  # noqa: E402

from common.config import Keys, env_name  # noqa: E402
from common.streams import PIPELINE_GROUPS  # noqa: E402

ROOT = C.HELM_DIR.parent.parent
ENV_FILE = ROOT / "compose" / "diffserve.env"
DASHBOARD = ROOT / "compose" / "grafana" / "dashboards" / "diffserve.json"
HELM = os.environ.get("HELM") or str(ROOT / ".tools" / "helm")
SERVICES = ("router", "controller", "gateway", "discriminator", "worker")
# Env vars of DiffServe containers that are not options of a service config: the Hugging Face cache.
NOT_OPTIONS = {"HF_HUB_OFFLINE", "HF_TOKEN"}
SECRETISH = ("PASSWORD", "API_KEYS", "TOKEN", "SECRET")


@pytest.fixture(scope="module", autouse=True)
def helm_binary():
    if not Path(HELM).is_file() and not shutil.which(HELM):
        pytest.fail(f"no helm at {HELM}: run `make chart-test` (it installs one) or set HELM")


def render(case: str, *sets: str) -> list[dict]:
    return C.render(HELM, C.CHART, C.values_files(case), sets)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {case: render(case) for case in C.CASES}


def of_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def workloads(objs: list[dict]) -> list[dict]:
    return [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")]


def named(objs: list[dict], kind: str, component: str) -> dict:
    (obj,) = [o for o in of_kind(objs, kind) if o["metadata"]["labels"]["app.kubernetes.io/component"] == component]
    return obj


def diffserve_containers(objs: list[dict]) -> list[tuple[dict, dict]]:
    """(workload, container) for every container that runs a DiffServe service."""
    return [
        (w, c)
        for w in workloads(objs)
        for c in w["spec"]["template"]["spec"]["containers"]
        if c.get("args") and c["args"][0] in SERVICES
    ]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def gpus(container: dict) -> int:
    resources = container.get("resources", {})
    return max(int(resources.get(part, {}).get("nvidia.com/gpu", 0)) for part in ("limits", "requests"))


def read_env_file() -> dict[str, str]:
    env = {}
    for line in ENV_FILE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    return env


def config_classes() -> dict[str, type]:
    from services.controller import ControllerConfig
    from services.discriminator import DiscriminatorConfig
    from services.gateway.config import GatewayConfig
    from services.router import RouterConfig
    from services.worker import WorkerConfig

    return {
        "router": RouterConfig,
        "controller": ControllerConfig,
        "gateway": GatewayConfig,
        "discriminator": DiscriminatorConfig,
        "worker": WorkerConfig,
    }


def options(cls: type) -> set[str]:
    return {env_name(f) for f in dataclasses.fields(cls)}


# ---------------------------------------------------------------- GPUs and scheduling


def test_one_gpu_per_worker_pod_and_none_with_cpu_values(rendered):
    for case in ("gpu", "keda"):
        worker = named(rendered[case], "StatefulSet", "worker")
        pod = worker["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert all(gpus(c) == 0 for c in pod.get("initContainers", []))
        assert pod["nodeSelector"]["nvidia.com/gpu.present"] == "true"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert env_of(container)["DIFFSERVE_DEVICE"]["value"] == "cuda"
        assert container["image"].startswith("registry.example.com/diffserve:"), "workers run the model image"
        # a heavy batch finishes within the grace period: the slowest H100 SDXL batch of 16 takes 31 s
        assert pod["terminationGracePeriodSeconds"] >= 60
    for obj in workloads(rendered["cpu"]):
        pod = obj["spec"]["template"]["spec"]
        for c in pod["containers"] + pod.get("initContainers", []):
            assert gpus(c) == 0, f"{obj['metadata']['name']} asks for a GPU with the CPU values"
            assert "nvidia" not in json.dumps(pod), obj["metadata"]["name"]
    cpu_worker = named(rendered["cpu"], "StatefulSet", "worker")["spec"]["template"]["spec"]["containers"][0]
    assert "diffserve-control" in cpu_worker["image"], "the profiled backend runs on the slim image"


def test_every_consumer_is_named_by_its_pod(rendered):
    for case, objs in rendered.items():
        seen = set()
        for _workload, container in diffserve_containers(objs):
            instance = env_of(container)["DIFFSERVE_INSTANCE_ID"]
            assert instance["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}, (case, container["name"])
            seen.add(container["args"][0])
        assert seen == set(SERVICES), (case, seen)
    worker = named(rendered["gpu"], "StatefulSet", "worker")
    assert worker["spec"]["podManagementPolicy"] == "Parallel"
    headless = named(rendered["gpu"], "Service", "worker")
    assert headless["spec"]["clusterIP"] == "None" and worker["spec"]["serviceName"] == headless["metadata"]["name"]
    controller = named(rendered["gpu"], "Deployment", "controller")
    assert controller["spec"]["replicas"] == 1 and controller["spec"]["strategy"]["type"] == "Recreate"


# ---------------------------------------------------------------- ports and probes


def test_probe_ports_are_the_metrics_ports(rendered):
    for case, objs in rendered.items():
        services = {s["metadata"]["labels"]["app.kubernetes.io/component"]: s for s in of_kind(objs, "Service")}
        for workload, container in diffserve_containers(objs):
            port = int(env_of(container)["METRICS_PORT"]["value"])
            (metrics,) = [p for p in container["ports"] if p["name"] == "metrics"]
            assert metrics["containerPort"] == port
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                command = container[probe]["exec"]["command"]
                assert command[:3] == ["diffserve", "healthcheck", "--quiet"], (case, probe)
                assert int(command[command.index("--port") + 1]) == port, (case, container["name"], probe)
            annotations = workload["spec"]["template"]["metadata"]["annotations"]
            assert annotations["prometheus.io/port"] == str(port) and annotations["prometheus.io/scrape"] == "true"
            component = workload["metadata"]["labels"]["app.kubernetes.io/component"]
            svc_ports = {p["name"]: p for p in services[component]["spec"]["ports"]}
            assert svc_ports["metrics"]["port"] == port and svc_ports["metrics"]["targetPort"] == "metrics"


def test_service_monitor_selects_every_metrics_service():
    objs = render("gpu", "metrics.serviceMonitor.enabled=true")
    (monitor,) = of_kind(objs, "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    selected = [s for s in of_kind(objs, "Service") if selector.items() <= s["metadata"]["labels"].items()]
    with_metrics = {s["metadata"]["name"] for s in selected if any(p["name"] == "metrics" for p in s["spec"]["ports"])}
    assert len(with_metrics) == len(SERVICES), with_metrics


def test_dashboard_config_map_is_the_compose_dashboard(rendered):
    (dash,) = [c for c in of_kind(rendered["gpu"], "ConfigMap") if "diffserve.json" in c.get("data", {})]
    assert json.loads(dash["data"]["diffserve.json"]) == json.loads(DASHBOARD.read_text())
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"


# ---------------------------------------------------------------- env and settings


def test_settings_keys_are_compose_env_keys_and_service_options(rendered):
    env_file = read_env_file()
    known = set().union(*(options(cls) for cls in config_classes().values()))
    for case, objs in rendered.items():
        settings = [c for c in of_kind(objs, "ConfigMap") if c["metadata"]["name"].endswith("-settings")]
        (config_map,) = settings
        assert set(config_map["data"]) >= set(env_file), f"[{case}] a compose/diffserve.env key is missing"
        unknown = set(config_map["data"]) - known
        assert not unknown, f"[{case}] settings no service reads: {sorted(unknown)}"
        for _workload, container in diffserve_containers(objs):
            assert container["envFrom"] == [{"configMapRef": {"name": config_map["metadata"]["name"]}}]
    # the chart's settings are compose's, key for key and value for value (extraSettings add options)
    values = yaml.safe_load((C.CHART / "values.yaml").read_text())
    assert {k: str(v) for k, v in values["settings"].items()} == env_file


def test_container_env_is_options_of_the_service_it_runs(rendered):
    classes = config_classes()
    for case, objs in rendered.items():
        config_map = next(c for c in of_kind(objs, "ConfigMap") if c["metadata"]["name"].endswith("-settings"))
        for _workload, container in diffserve_containers(objs):
            service = container["args"][0]
            allowed = options(classes[service])
            extra = set(env_of(container)) - allowed - NOT_OPTIONS
            assert not extra, f"[{case}] {service} gets env vars it does not read: {sorted(extra)}"
            # and the values parse with the service's own config class, secrets stood in for
            env = dict(config_map["data"])
            for name, item in env_of(container).items():
                env[name] = item.get("value", "s3cret")
            env["DIFFSERVE_INSTANCE_ID"] = "pod-0"
            config = classes[service].from_namespace(None, env=env)
            assert config.metrics_port == int(env_of(container)["METRICS_PORT"]["value"])


# ---------------------------------------------------------------- streams, groups, autoscaler


@pytest.mark.parametrize("namespace", ["diffserve", "blue"])
def test_autoscaler_streams_and_groups_are_the_pipelines(namespace):
    objs = render("keda", f"settings.DIFFSERVE_NAMESPACE={namespace}")
    keys = Keys(namespace)
    groups = {getattr(keys, attr): group for attr, group in PIPELINE_GROUPS}
    (scaled,) = of_kind(objs, "ScaledObject")
    triggers = scaled["spec"]["triggers"]
    streams = {t["metadata"]["stream"]: t["metadata"] for t in triggers if t["type"] == "redis-streams"}
    assert set(streams) == {keys.light_queue, keys.heavy_queue}
    for stream, meta in streams.items():
        assert meta["consumerGroup"] == groups[stream]
        assert meta["address"] == "redis.data.svc.cluster.local:6380" and meta["enableTLS"] == "true"
        assert meta["passwordFromEnv"] == "REDIS_PASSWORD" and meta["usernameFromEnv"] == "REDIS_USERNAME"
    worker = named(objs, "StatefulSet", "worker")
    assert "replicas" not in worker["spec"], "KEDA owns the replica count"
    assert scaled["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": worker["metadata"]["name"],
    }
    env = env_of(worker["spec"]["template"]["spec"]["containers"][0])
    assert {"REDIS_PASSWORD", "REDIS_USERNAME"} <= set(env), "KEDA reads the workers' Redis login from their env"
    (wanted,) = [t for t in triggers if t["type"] == "metrics-api"]
    meta = wanted["metadata"]
    controller = named(objs, "Service", "controller")
    port = next(p["port"] for p in controller["spec"]["ports"] if p["name"] == "metrics")
    assert meta["url"] == f"http://{controller['metadata']['name']}.{C.NAMESPACE}.svc:{port}/metrics"
    assert meta["format"] == "prometheus" and meta["valueLocation"] == "diffserve_workers_wanted"
    # AverageValue with target 1: the replica count is the metric itself
    assert wanted["metricType"] == "AverageValue" and float(meta["targetValue"]) == 1.0
    from common.metrics import WORKERS_WANTED

    assert WORKERS_WANTED.describe()[0].name == meta["valueLocation"]


def test_prometheus_source_queries_the_gauge():
    objs = render(
        "keda", "autoscaling.keda.source=prometheus", "autoscaling.keda.prometheus.serverAddress=http://p:9090"
    )
    (scaled,) = of_kind(objs, "ScaledObject")
    (prom,) = [t for t in scaled["spec"]["triggers"] if t["type"] == "prometheus"]
    assert "diffserve_workers_wanted" in prom["metadata"]["query"] and prom["metadata"]["threshold"] == "1"


# ---------------------------------------------------------------- secrets


def test_secrets_only_by_reference(rendered):
    for case, objs in rendered.items():
        assert not of_kind(objs, "Secret"), f"[{case}] the chart must not carry a Secret"
        text = json.dumps(objs)
        for workload in workloads(objs):
            pod = workload["spec"]["template"]["spec"]
            for container in pod["containers"] + pod.get("initContainers", []):
                for name, item in env_of(container).items():
                    if any(word in name for word in SECRETISH):
                        assert set(item) == {"name", "valueFrom"} and "secretKeyRef" in item["valueFrom"], (
                            f"[{case}] {container['name']}: {name} must come from a Secret"
                        )
                if "REDIS_URL" in env_of(container):
                    assert "@" not in env_of(container)["REDIS_URL"]["value"], "credentials in REDIS_URL"
        assert "password=" not in text.lower()
    gpu = rendered["gpu"]
    refs = {
        e["valueFrom"]["secretKeyRef"]["name"]
        for _w, c in diffserve_containers(gpu)
        for e in c["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert refs == {"diffserve-redis", "diffserve-gateway"}
    # one ACL user per service, each with its own key of the Secret
    users = {
        c["args"][0]: (env_of(c)["REDIS_USERNAME"]["value"], env_of(c)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"])
        for _w, c in diffserve_containers(gpu)
    }
    for service, (user, ref) in users.items():
        assert user == service and ref == {"name": "diffserve-redis", "key": f"{service}-password"}


def test_in_chart_redis_creates_the_acl_users_from_the_secret():
    objs = render("cpu", "redis.acl.enabled=true")
    redis = named(objs, "StatefulSet", "redis")
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    assert command[0] == "redis-server"
    assert command[command.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    env = env_of(container)
    for service in SERVICES:
        at = command.index(service, command.index("--user"))
        assert command[at - 1] == "--user" and command[at + 1 : at + 3] == ["reset", "on"]
        var = command[at + 3][len(">$(") : -1]
        assert env[var]["valueFrom"]["secretKeyRef"] == {"name": "diffserve-redis", "key": f"{service}-password"}
        assert command[at + 4 : at + 8] == ["~diffserve:*", "&diffserve:*", "+@all", "-@dangerous"]
    url = env_of(diffserve_containers(objs)[0][1])["REDIS_URL"]["value"]
    assert url == f"redis://{redis['metadata']['name']}:6379/0"


def test_required_values_fail_with_a_clear_message():
    result = subprocess.run(
        [HELM, "template", "x", str(C.CHART), "--set", "gateway.apiKeys.existingSecret=k"],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "redis.url is required" in result.stderr
    result = subprocess.run(
        [HELM, "template", "x", str(C.CHART), "--set", "redis.url=redis://r:6379/0", "--set", "workers.gpuu=1"],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "gpuu" in result.stderr, "values.schema.json rejects unknown values"


# ---------------------------------------------------------------- the check fails on a broken field


@pytest.mark.parametrize(
    "template, good, bad, reported",
    [
        (
            "workers.yaml",
            "terminationGracePeriodSeconds:",
            "terminationGracePeriodSecond:",
            "terminationGracePeriodSecond",
        ),
        ("scaledobject.yaml", "minReplicaCount:", "minReplicas:", "minReplicas"),
        ("_helpers.tpl", "containerPort: {{ .port }}", 'containerPort: "{{ .port }}"', "is not of type 'integer'"),
    ],
)
def test_a_broken_field_fails_the_check(tmp_path, template, good, bad, reported):
    chart = tmp_path / "diffserve"
    shutil.copytree(C.CHART, chart, symlinks=False)
    path = chart / "templates" / template
    text = path.read_text()
    assert good in text
    path.write_text(text.replace(good, bad, 1))
    result = subprocess.run(
        [sys.executable, str(C.HELM_DIR / "chart_check.py"), "--helm", HELM, "--chart", str(chart)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 1, result.stdout
    assert reported in result.stdout and "chart-check: FAIL" in result.stdout
