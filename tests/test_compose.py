"""The compose deployment (compose/) agrees with the code: commands, env vars, metrics
ports, Prometheus targets, GPU reservations, the dashboard's metric names, the image's
pins; plus ``diffserve healthcheck`` against a real Prometheus client endpoint.

No Docker engine is needed: the files are parsed with PyYAML, and ``docker-compose
config`` / ``docker compose config`` validates them where such a binary exists.

Longer than 500 lines on purpose: the compose files are read once and every check of them against the
code sits beside the others (a split would only move the shared parsing helpers)."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from common.config import ServiceConfig, env_name
from diffserve.cli import COMMANDS
from tools.compose_files import absolute_paths, load, merge

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose"
BASE_FILE = COMPOSE / "docker-compose.yml"
CPU_FILE = COMPOSE / "docker-compose.cpu.yml"
HOSTNET_FILE = COMPOSE / "docker-compose.hostnet.yml"
ENV_FILE = COMPOSE / "diffserve.env"
ENV_EXAMPLE = COMPOSE / ".env.example"
DASHBOARD = COMPOSE / "grafana" / "dashboards" / "diffserve.json"
PROMETHEUS = COMPOSE / "prometheus.yml"

SERVICE_COMMANDS = {"router", "worker", "discriminator", "controller", "gateway"}
# Controller options the env file sets; while services/controller.py cannot be imported they are
# taken on trust, once it can they must be real options of its config like every other key.
PENDING_CONTROLLER_KEYS = {"DIFFSERVE_INTERVAL_S", "DIFFSERVE_POLICY"}


# ---------------------------------------------------------------- loading and merging


@pytest.fixture(scope="module")
def base() -> dict:
    return load(BASE_FILE)


@pytest.fixture(scope="module")
def cpu(base) -> dict:
    return merge(base, load(CPU_FILE))


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=value: {line!r}"
            env[key.strip()] = value
    return env


def environment(service: dict) -> dict[str, str]:
    """The service's environment: env_file entries, then ``environment`` (which wins)."""
    env: dict[str, str] = {}
    env_files = service.get("env_file", [])
    for name in [env_files] if isinstance(env_files, str) else env_files:
        env.update(read_env_file(COMPOSE / name))
    raw = service.get("environment", {})
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    env.update({k: "" if v is None else str(v) for k, v in raw.items()})
    return env


def diffserve_services(tree: dict) -> dict[str, dict]:
    """Services that run one of the four pipeline services from the diffserve image."""
    return {
        name: svc
        for name, svc in tree["services"].items()
        if "entrypoint" not in svc and svc.get("command") and svc["command"][0] in SERVICE_COMMANDS
    }


def health_port(service: dict) -> int:
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "diffserve", "healthcheck"], test
    return int(test[test.index("--port") + 1])


def gpu_devices(service: dict) -> list:
    return (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []


def prometheus_targets() -> dict[str, str]:
    """target -> job name."""
    conf = yaml.safe_load(PROMETHEUS.read_text())
    return {
        target: job["job_name"]
        for job in conf["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    }


# ---------------------------------------------------------------- commands, env, ports


def test_every_command_is_a_diffserve_command(base, cpu):
    for tree in (base, cpu):
        for name, svc in tree["services"].items():
            if not uses_diffserve_image(svc):
                continue
            if "entrypoint" in svc:  # the one-shot model download
                assert name == "models"
                continue
            command = svc["command"]
            assert isinstance(command, list) and command, name
            assert command[0] in COMMANDS, f"{name}: `diffserve {command[0]}` is not a command"
            assert health_port(svc) > 0
            assert "healthcheck" in COMMANDS
    assert set(diffserve_services(base)) >= {"router", "discriminator", "controller", "gateway", "worker-0", "worker-1"}
    assert {svc["command"][0] for svc in diffserve_services(base).values()} == SERVICE_COMMANDS


def uses_diffserve_image(service: dict) -> bool:
    build = service.get("build") or {}
    return build.get("dockerfile") == "compose/Dockerfile" or str(service.get("image", "")).startswith("${DIFFSERVE")


def test_services_reach_redis_with_password_and_wait_for_it(base, cpu):
    for tree in (base, cpu):
        for name, svc in diffserve_services(tree).items():
            env = environment(svc)
            assert re.fullmatch(r"redis://:\$\{REDIS_PASSWORD(:\?[^}]*)?\}@redis:6379/0", env["REDIS_URL"]), name
            assert svc["depends_on"]["redis"]["condition"] == "service_healthy", name
            for dep, spec in svc["depends_on"].items():
                assert isinstance(spec, dict) and spec.get("condition") == "service_healthy", (name, dep)
            assert env.get("DIFFSERVE_INSTANCE_ID") == name, f"{name}: give it a stable consumer name"


def test_metrics_ports_match_healthchecks_and_prometheus(base):
    targets = prometheus_targets()
    ports = {}
    for name, svc in diffserve_services(base).items():
        port = int(environment(svc)["METRICS_PORT"])
        assert port > 0, name
        assert health_port(svc) == port, f"{name}: healthcheck port != METRICS_PORT"
        assert f"{name}:{port}" in targets, f"{name}:{port} is not scraped by prometheus.yml"
        ports[name] = port
    assert len(set(ports.values())) == len(ports), f"metrics ports collide: {ports}"
    # and every scrape target is a service of the file (or Prometheus itself)
    for target in targets:
        host, _, port = target.rpartition(":")
        if host != "localhost":
            assert ports.get(host) == int(port), f"prometheus target {target} matches no service"
    assert "prometheus" in base["services"]


def test_gpu_workers_are_pinned_one_gpu_each(base):
    workers = {name: svc for name, svc in diffserve_services(base).items() if svc["command"][0] == "worker"}
    assert len(workers) >= 2
    seen = set()
    for name, svc in workers.items():
        assert name.startswith("worker-")
        devices = gpu_devices(svc)
        assert len(devices) == 1, f"{name}: needs one GPU reservation"
        device = devices[0]
        assert device["driver"] == "nvidia"
        assert device["capabilities"] == ["gpu"]
        assert len(device["device_ids"]) == 1 and "count" not in device, f"{name}: pin exactly one device id"
        assert device["device_ids"][0] not in seen, f"{name}: GPU {device['device_ids'][0]} used twice"
        seen.add(device["device_ids"][0])
        assert environment(svc)["DIFFSERVE_DEVICE"] == "cuda"
    assert gpu_devices(base["services"]["discriminator"]), "the discriminator runs on a GPU too"
    assert read_env_file(ENV_FILE)["DIFFSERVE_BACKEND"] == "diffusers"


def test_cpu_override_has_no_gpu_and_runs_profiled(cpu):
    raw = CPU_FILE.read_text()
    assert "nvidia" not in raw and "device_ids" not in raw
    assert set(cpu["services"]) == set(load(BASE_FILE)["services"]), "the override adds or drops no service"
    for name, svc in cpu["services"].items():
        assert not gpu_devices(svc), f"{name} still reserves a GPU in the CPU variant"
    for name, svc in diffserve_services(cpu).items():
        env = environment(svc)
        assert env["DIFFSERVE_BACKEND"] == "profiled", name
        assert env.get("DIFFSERVE_DEVICE", "cpu") == "cpu", name
        assert svc["build"]["target"] == "control", f"{name}: the profiled backend runs on the slim image"
        assert "cuda" not in svc["build"]["args"]["BASE_IMAGE"], name
        assert svc["image"] == cpu["services"]["router"]["image"], name
        assert "volumes" not in svc, f"{name}: no models to mount"


def test_control_plane_and_models_run_their_own_images(base):
    for name, svc in diffserve_services(base).items():
        target = svc["build"]["target"]
        if svc["command"][0] in ("router", "controller", "gateway"):
            assert target == "control" and "args" not in svc["build"], name
            assert svc["image"].startswith("${DIFFSERVE_CONTROL_IMAGE"), name
        else:
            assert target == "models" and "cuda" in svc["build"]["args"]["BASE_IMAGE"], name
            assert svc["image"].startswith("${DIFFSERVE_IMAGE"), name
    assert base["services"]["models"]["build"]["target"] == "models"
    text = (COMPOSE / "Dockerfile").read_text()
    assert re.search(r"^FROM \$\{BASE_IMAGE\} AS control$", text, re.M)
    assert re.search(r"^FROM control AS models$", text, re.M)


def test_hostnet_override_is_loopback_only(cpu):
    hostnet = merge(cpu, load(HOSTNET_FILE))
    for name, svc in diffserve_services(hostnet).items():
        env = environment(svc)
        assert svc["network_mode"] == "host", name
        assert re.fullmatch(
            r"redis://:\$\{REDIS_PASSWORD(:\?[^}]*)?\}@127\.0\.0\.1:\$\{REDIS_PORT:-6379\}/0", env["REDIS_URL"]
        ), name
        assert env["METRICS_ADDR"] == "127.0.0.1", name
    redis = hostnet["services"]["redis"]
    command = [str(c) for c in redis["command"]]
    assert redis["network_mode"] == "host" and command[command.index("--bind") + 1] == "127.0.0.1"
    assert "ports" not in redis, "published ports and host networking do not mix"
    assert command[command.index("--port") + 1] == "${REDIS_PORT:-6379}"
    assert command[command.index("--requirepass") + 1].startswith("${REDIS_PASSWORD")
    assert "${REDIS_PORT:-6379}" in " ".join(redis["healthcheck"]["test"])
    prometheus = hostnet["services"]["prometheus"]
    assert prometheus["network_mode"] == "host" and "ports" not in prometheus
    assert "--web.listen-address=127.0.0.1:9090" in prometheus["command"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in prometheus["volumes"]}
    assert mounts["/etc/prometheus/prometheus.yml"] == "./prometheus.hostnet.yml"
    bridge = yaml.safe_load(PROMETHEUS.read_text())
    host = yaml.safe_load((COMPOSE / "prometheus.hostnet.yml").read_text())
    for job in bridge["scrape_configs"]:
        for static in job["static_configs"]:
            static["targets"] = ["127.0.0.1:" + t.rpartition(":")[2] for t in static["targets"]]
    assert host == bridge, "prometheus.hostnet.yml must scrape what prometheus.yml does, on 127.0.0.1"


def test_redis_is_persistent_password_protected_and_healthchecked(base):
    redis = base["services"]["redis"]
    assert re.fullmatch(r"\$\{REDIS_IMAGE:-redis:7(\.|-)\S*\}", redis["image"]), redis["image"]
    command = [str(c) for c in redis["command"]]
    assert command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--requirepass") + 1].startswith("${REDIS_PASSWORD")
    assert redis["healthcheck"]["test"], "redis needs a healthcheck for service_healthy"
    assert "ping" in " ".join(redis["healthcheck"]["test"])
    assert any(str(v).startswith("redis-data:/data") for v in redis["volumes"]), "AOF must live on a volume"


def test_models_service_downloads_into_the_shared_volume(base):
    models = base["services"]["models"]
    assert models["profiles"] == ["setup"]
    script = models["entrypoint"][-1]
    assert script == "/opt/diffserve/compose/download_models.py"
    assert (COMPOSE / "download_models.py").is_file()
    assert "models:/models" in models["volumes"]
    for name, svc in diffserve_services(base).items():
        if svc["build"]["target"] == "models":
            assert "models:/models" in svc["volumes"], name
    assert "HF_HOME=/models/hf" in (COMPOSE / "Dockerfile").read_text()


def test_download_models_lists_the_cascade_hub_ids(capsys, monkeypatch):
    import importlib.util
    import sys

    from common.cascades import CASCADES, MODELS

    spec = importlib.util.spec_from_file_location("download_models", COMPOSE / "download_models.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "download_models", module)  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    assert module.main(["--all", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for cascade in CASCADES.values():
        for model in (MODELS[cascade.light], MODELS[cascade.heavy]):
            assert model.hub_id in out
            if model.unet_file:
                assert f"{model.unet_repo}: {model.unet_file}" in out
    assert module.main(["--cascade", "no-such-cascade", "--dry-run"]) == 2
    one = module.downloads_for(["sdturbo-sdv15"])
    assert [d.repo_id for d in one] == [MODELS["sdturbo"].hub_id, MODELS["sdv15"].hub_id]


# ---------------------------------------------------------------- env files


def known_env_vars() -> tuple[set[str], bool]:
    from services.discriminator import DiscriminatorConfig
    from services.gateway.config import GatewayConfig
    from services.router import RouterConfig
    from services.worker import WorkerConfig

    classes = [RouterConfig, WorkerConfig, DiscriminatorConfig, GatewayConfig]
    controller = False
    try:
        import services.controller as ctl
    except ImportError:
        pass
    else:
        found = [
            obj
            for obj in vars(ctl).values()
            if isinstance(obj, type) and issubclass(obj, ServiceConfig) and obj is not ServiceConfig
        ]
        controller = bool(found)
        classes += found
    names = {env_name(f) for cls in classes for f in dataclasses.fields(cls)}
    return names, controller


def test_env_file_keys_are_options_of_the_services():
    known, controller = known_env_vars()
    keys = set(read_env_file(ENV_FILE))
    unknown = keys - known
    if not controller:
        unknown -= PENDING_CONTROLLER_KEYS
    assert not unknown, f"compose/diffserve.env sets env vars no service reads: {sorted(unknown)}"
    for required in ("DIFFSERVE_CASCADE", "DIFFSERVE_SLO_MS", "DIFFSERVE_BACKEND", "DIFFSERVE_TIME_SCALE"):
        assert required in keys


def test_env_file_values_parse_and_every_line_is_documented():
    from common.backends import BACKENDS
    from common.cascades import CASCADES

    env = read_env_file(ENV_FILE)
    assert env["DIFFSERVE_CASCADE"] in CASCADES
    assert env["DIFFSERVE_BACKEND"] in BACKENDS
    float(env["DIFFSERVE_TIME_SCALE"])
    assert env["DIFFSERVE_SLO_MS"] == "" or float(env["DIFFSERVE_SLO_MS"]) > 0
    if "DIFFSERVE_POLICY" in env:
        from common.planner import POLICIES

        assert env["DIFFSERVE_POLICY"] in POLICIES
    lines = ENV_FILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip() and not line.startswith("#"):
            assert i > 0 and lines[i - 1].startswith("#"), f"diffserve.env: no comment above {line!r}"
            assert "${" not in line, "env files are not interpolated by every compose version"


def test_env_values_reach_the_configs_as_valid_options():
    """What compose hands each service parses with the service's own config class."""
    from services.discriminator import DiscriminatorConfig
    from services.gateway.config import GatewayConfig
    from services.router import RouterConfig
    from services.worker import WorkerConfig

    classes = {
        "router": RouterConfig,
        "worker": WorkerConfig,
        "discriminator": DiscriminatorConfig,
        "gateway": GatewayConfig,
    }
    try:
        from services.controller import ControllerConfig
    except ImportError:
        pass
    else:
        classes["controller"] = ControllerConfig
    for tree in (load(BASE_FILE), merge(load(BASE_FILE), load(CPU_FILE))):
        for name, svc in diffserve_services(tree).items():
            cls = classes.get(svc["command"][0])
            if cls is None:
                continue
            env = {
                k: v.replace("${REDIS_PASSWORD:?set REDIS_PASSWORD in compose/.env}", "pw").replace(
                    "${DISCRIMINATOR_BACKEND:-diffusers}", "diffusers"
                )
                for k, v in environment(svc).items()
            }
            config = cls.from_namespace(None, env=env)
            assert config.metrics_port == health_port(svc)
            assert config.instance_id == name


def test_env_example_covers_every_variable_the_compose_files_use():
    example = ENV_EXAMPLE.read_text()
    active = read_env_file(ENV_EXAMPLE)
    assert {"REDIS_PASSWORD", "GRAFANA_ADMIN_PASSWORD"} <= set(active)
    for path in (BASE_FILE, CPU_FILE, HOSTNET_FILE):
        for var, op in re.findall(r"\$\{([A-Z0-9_]+)(:\?|:-|-|\?)?", path.read_text()):
            assert re.search(rf"^#?{var}=", example, re.M), f"{var} ({path.name}) is not in .env.example"
            if op == ":?":
                assert var in active, f"{var} is required but commented out in .env.example"


# ---------------------------------------------------------------- dashboard and provisioning


def metric_sample_names() -> set[str]:
    """Every sample name common/metrics.py can expose."""
    from prometheus_client.metrics import MetricWrapperBase

    from common import metrics

    names = set()
    for obj in vars(metrics).values():
        if not isinstance(obj, MetricWrapperBase):
            continue
        for family in obj.describe():
            suffixes = {
                "counter": ("_total", "_created"),
                "histogram": ("_bucket", "_sum", "_count", "_created"),
                "gauge": ("",),
                "summary": ("", "_sum", "_count"),
            }.get(family.type, ("",))
            names |= {family.name + s for s in suffixes}
    return names


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = []
    for panel in dash["panels"]:
        for sub in [panel] + panel.get("panels", []):
            exprs += [t["expr"] for t in sub.get("targets", [])]
    return exprs


def test_dashboard_uses_only_real_metrics_and_has_the_key_panels():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"]
    exprs = dashboard_exprs()
    used = set(re.findall(r"\bdiffserve_[a-z_]+", " ".join(exprs)))
    known = metric_sample_names()
    assert used and not used - known, f"dashboard queries unknown metrics: {sorted(used - known)}"
    for needed in (
        "diffserve_demand_qps",
        "diffserve_processed_total",
        "diffserve_slo_total",
        "diffserve_threshold",
        "diffserve_workers",
        "diffserve_queue_depth",
        "diffserve_batch_latency_seconds_bucket",
        "diffserve_workers_wanted",
        "diffserve_estimated_quality",
    ):
        assert needed in used, f"no panel shows {needed}"
    text = " ".join(exprs)
    assert 'outcome="delivered"' in text and "histogram_quantile" in text
    titles = {p["title"] for p in dash["panels"]}
    for title in (
        "Demand vs throughput",
        "SLO misses",
        "Threshold",
        "Workers per role",
        "Queue depths",
        "Batch latency",
        "Workers wanted",
        "Gateway requests by status",
        "Gateway 429s and limits",
        "Per-key use",
        "Gateway latency",
    ):
        assert title in titles


def test_grafana_provisioning_points_at_the_dashboard_and_datasource(base):
    ds = yaml.safe_load(next((COMPOSE / "grafana/provisioning/datasources").glob("*.yml")).read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    uids = {p["datasource"]["uid"] for p in json.loads(DASHBOARD.read_text())["panels"] if "datasource" in p}
    assert uids == {source["uid"]}
    providers = yaml.safe_load(next((COMPOSE / "grafana/provisioning/dashboards").glob("*.yml")).read_text())
    path = providers["providers"][0]["options"]["path"]
    grafana = base["services"]["grafana"]
    assert f"./grafana/dashboards:{path}:ro" in grafana["volumes"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD")
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in base["services"]["prometheus"]["volumes"]


# ---------------------------------------------------------------- the image


def test_dockerfile_pins_torch_like_pyproject_and_runs_as_non_root():
    text = (COMPOSE / "Dockerfile").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = dict(
        dep.split("==")
        for dep in project["optional-dependencies"]["models"]
        if dep.startswith(("torch==", "torchvision=="))
    )
    assert not [
        dep for dep in project["dependencies"] if dep.startswith(("torch", "diffusers", "transformers", "timm"))
    ]
    assert f"ARG TORCH_VERSION={pins['torch']}" in text
    assert f"ARG TORCHVISION_VERSION={pins['torchvision']}" in text
    assert re.search(r"^USER (?!root\b)\S+", text, re.M), "the image must not run as root"
    assert 'ENTRYPOINT ["diffserve"]' in text
    ignore = (ROOT / ".dockerignore").read_text().split()
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for pattern in packages["include"]:
        assert f"!{pattern.rstrip('*')}/" in ignore, f"the build context leaves out {pattern}"
    assert "!compose/download_models.py" in ignore and "!pyproject.toml" in ignore and "!constraints.txt" in ignore


# ---------------------------------------------------------------- a real compose binary, where there is one


def compose_binary() -> tuple[list[str], tuple[int, ...]] | None:
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    for cmd in candidates:
        try:
            out = subprocess.run(cmd + ["version", "--short"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        match = re.search(r"(\d+)\.(\d+)\.(\d+)", out.stdout)
        if out.returncode == 0 and match:
            return cmd, tuple(int(x) for x in match.groups())
    return None


def run_config(cmd: list[str], files: list[Path]) -> subprocess.CompletedProcess:
    args = cmd + ["--env-file", str(ENV_EXAMPLE), "--project-directory", str(COMPOSE)]
    for f in files:
        args += ["-f", str(f)]
    return subprocess.run(
        args + ["--profile", "setup", "config", "-q"], capture_output=True, text=True, timeout=120, cwd=COMPOSE
    )


def test_compose_config_validates(tmp_path):
    found = compose_binary()
    if found is None:
        pytest.skip("no docker compose / docker-compose binary")
    cmd, version = found
    result = run_config(cmd, [BASE_FILE])
    assert result.returncode == 0, result.stderr
    if version >= (2, 24, 0):
        for files in ([BASE_FILE, CPU_FILE], [BASE_FILE, CPU_FILE, HOSTNET_FILE]):
            result = run_config(cmd, files)
            assert result.returncode == 0, result.stderr
    else:
        # Older compose has no `!reset`: validate the CPU stacks as merged here instead.
        cpu = merge(load(BASE_FILE), load(CPU_FILE))
        for name, tree in (("cpu", cpu), ("hostnet", merge(cpu, load(HOSTNET_FILE)))):
            merged = tmp_path / f"docker-compose.{name}-merged.yml"
            merged.write_text(yaml.safe_dump(absolute_paths(tree, COMPOSE), sort_keys=False))
            result = run_config(cmd, [merged])
            assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- diffserve healthcheck


@pytest.fixture
def metrics_server():
    from prometheus_client import CollectorRegistry, Gauge, start_http_server

    from common import metrics

    registry = CollectorRegistry()
    # The same name and labels as the services' gauge, in a registry of this test's own.
    ready = Gauge(metrics.READY._name, "ready", list(metrics.READY._labelnames), registry=registry)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        yield server.server_port, ready
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def healthcheck(*argv: str) -> int:
    from common.health import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    return exit_info.value.code


def test_healthcheck_follows_the_ready_gauge(metrics_server, capsys):
    port, ready = metrics_server
    assert healthcheck("--port", str(port)) == 1  # labelled gauge, no sample yet
    assert "no diffserve_ready" in capsys.readouterr().err
    ready.labels("worker").set(0)
    assert healthcheck("--port", str(port), "--timeout", "3") == 1
    assert "worker=0" in capsys.readouterr().err
    ready.labels("worker").set(1)
    assert healthcheck("--port", str(port), "--host", "127.0.0.1") == 0
    assert "ready: worker" in capsys.readouterr().out
    assert healthcheck("--port", str(port), "--service", "router") == 1
    assert healthcheck("--port", str(port), "--service", "worker", "--quiet") == 0
    assert capsys.readouterr().out == ""


def test_healthcheck_fails_when_nothing_listens(capsys):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        assert healthcheck("--port", str(port), "--timeout", "1") == 1
    assert "cannot fetch" in capsys.readouterr().err


def test_healthcheck_is_reachable_from_the_cli(metrics_server):
    import sys

    port, ready = metrics_server
    ready.labels("router").set(1)
    result = subprocess.run(
        [sys.executable, "-m", "diffserve", "healthcheck", "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr


def test_ready_lines_parse_in_both_exposition_formats():
    from common.health import ready_services

    text = (
        "# HELP diffserve_ready x\n# TYPE diffserve_ready gauge\n"
        'diffserve_ready{service="router"} 1.0\ndiffserve_ready{service="worker"} 0.0\n'
        'diffserve_ready_other{service="x"} 1.0\n'
        'diffserve_ready{instance="a",service="controller"} 1 1700000000\n'
    )
    assert ready_services(text) == {"router": 1.0, "worker": 0.0, "controller": 1.0}


# ---------------------------------------------------------------- the CPU stack's environment, run for real


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_cpu_stack_environment_runs_and_turns_healthy(tmp_path):
    """Start router, controller, gateway, discriminator and the workers with exactly the environment the CPU override
    gives them (Redis host and metrics ports remapped to this machine), wait for the compose
    healthcheck command to pass, then push a job the way the README does and read its result."""
    import importlib.util
    import os
    import sys
    import time

    if not shutil.which("redis-server"):
        pytest.skip("no redis-server")
    redis = pytest.importorskip("redis")
    port = _free_port()
    subprocess.run(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--requirepass",
            "pw",
            "--daemonize",
            "yes",
            "--pidfile",
            str(tmp_path / "redis.pid"),
        ],
        check=True,
        timeout=30,
    )
    procs: dict[str, tuple[subprocess.Popen, int]] = {}
    try:
        tree = merge(load(BASE_FILE), load(CPU_FILE))
        for name, svc in diffserve_services(tree).items():
            if svc["command"][0] == "controller" and importlib.util.find_spec("services.controller") is None:
                continue  # not written yet; serving works without it
            env = {**os.environ, **environment(svc)}
            env["REDIS_URL"] = f"redis://:pw@127.0.0.1:{port}/0"
            env["METRICS_PORT"] = str(_free_port())
            command = list(svc["command"])
            if command[0] == "gateway":  # its HTTP port remapped too; a key where compose interpolates one
                command[command.index("--port") + 1] = str(_free_port())
                env["DIFFSERVE_API_KEYS"] = "test:" + "0" * 64
            with open(tmp_path / f"{name}.log", "w") as log:  # the process has its own copy
                procs[name] = (
                    subprocess.Popen(
                        [sys.executable, "-m", "diffserve", *command],
                        env=env,
                        cwd=ROOT,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    ),
                    int(env["METRICS_PORT"]),
                )
        deadline = time.monotonic() + 120
        for name, (proc, metrics_port) in procs.items():
            while True:
                check = subprocess.run(
                    [sys.executable, "-m", "diffserve", "healthcheck", "--port", str(metrics_port)],
                    capture_output=True,
                    text=True,
                    timeout=30,
                    cwd=ROOT,
                )
                if check.returncode == 0:
                    break
                assert proc.poll() is None, (tmp_path / f"{name}.log").read_text()[-2000:]
                assert time.monotonic() < deadline, f"{name} not healthy: {check.stderr}"
                time.sleep(0.3)
        client = redis.Redis(host="127.0.0.1", port=port, password="pw")
        try:
            client.xadd("diffserve:jobs", {"job_id": "j1", "prompt": "a cat"})
            assert client.blpop("diffserve:result:j1", 60) is not None
        finally:
            client.close()
    finally:
        for proc, _ in procs.values():
            proc.terminate()
        for proc, _ in procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        subprocess.run(
            ["redis-cli", "-p", str(port), "-a", "pw", "--no-auth-warning", "shutdown", "nosave"],
            capture_output=True,
            timeout=30,
        )
