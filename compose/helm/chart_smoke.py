"""``make chart-smoke``: the Helm chart's CPU values, rendered by ``helm template`` and run for real with
Debian's ``podman kube play`` on this machine, on loopback only (opt-in, as root; not part of CI).

It installs podman, catatonit, runc, debootstrap and python3-pip where missing, builds the control
image with podman (``ENGINE=podman compose/build-offline.sh``: no Docker engine, no registry), renders
the chart with ``examples/values-cpu.yaml`` plus this machine's overrides (host network, free loopback
ports, the in-chart Redis with one ACL user per service, the profiled backend 5x faster), and plays it.
Then: every pod healthy (each container's own readiness probe, run with ``podman exec``), 100 jobs
answered exactly once (20 ``XADD`` with plain fields, 10 through the gateway's HTTP API with the key from
its Secret, 10 through the Python client, a burst of 60 during
which a worker pod is killed while it holds entries and comes back under its name, as a StatefulSet's
would), its entries reclaimed, and nothing of the release left afterwards.

What ``podman kube play`` (4.3) lacks, and what this script does instead (the shim, nothing else):

- no StatefulSet: each replica becomes a Pod named ``<statefulset>-<ordinal>``, as Kubernetes names them;
  its volumeClaimTemplates become emptyDir volumes;
- host-network replicas share one port space: worker ``i`` gets its own METRICS_PORT (probes and
  containerPort follow), where each pod has its own IP on a cluster;
- no ``$(VAR)`` expansion in command/args: a command that uses it (the in-chart Redis's passwords) runs
  as ``sh -c 'exec ...'`` with the same words, the variables expanded by the shell;
- podman applies the 63-character limit of label values to annotations: the 64-character
  checksum/settings annotation is shortened;
- with host networking podman refuses port mappings, which it derives from containerPort: ports are
  dropped (every port is on the host already);
- Secrets come from podman's secret store (a JSON map of base64 values per Secret), created here;
- Services, the ServiceAccount and the PodDisruptionBudget need a cluster: dropped (with the chart's
  ``hostNetwork`` every pod reaches the in-chart Redis on 127.0.0.1, no Service name to resolve).

On this kernel (cgroup v1 with a v2 hierarchy mounted: "hybrid") Debian's crun 1.8 refuses to start
containers, so the script's containers.conf selects runc; it also raises the ulimits podman would copy
from the host.  Prints a summary; exits non-zero on any failure.

One script on purpose: the opt-in smoke run, read top to bottom, like compose/compose_test.py (what the
two share, the job checks and the summary, is in tools/smoke.py)."""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import hashlib
import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import redis
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import chart_check as C  # noqa: E402

import tools.smoke  # noqa: E402  # used qualified: `smoke` here names the run
from common.config import Keys  # noqa: E402
from common.localstack import free_port  # noqa: E402

CONTROL_IMAGE = "localhost/diffserve-control:latest"
REDIS_IMAGE = "localhost/diffserve-base:bookworm"  # build-offline.sh's base: it has redis-server
CONTAINERS_CONF = """[containers]
default_ulimits = ["nofile=16384:16384", "nproc=4096:4096"]
[engine]
runtime = "runc"
"""
TIME_SCALE = "0.2"
RECLAIM_IDLE_MS = "3000"
SERVICES = ("router", "controller", "gateway", "discriminator", "worker")
_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
NAME = "chart-smoke"
# tool -> the Debian package that has it, installed where missing
PACKAGES = {"podman": "podman", "catatonit": "catatonit", "runc": "runc", "debootstrap": "debootstrap"}


class Podman:
    def __init__(self, workdir: Path):
        conf = workdir / "containers.conf"
        conf.write_text(CONTAINERS_CONF)
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}

    def __call__(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, env=self.env)
        if check and result.returncode != 0:
            raise SystemExit(
                f"chart-smoke: podman {' '.join(args[:3])} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
            )
        return result


# ---------------------------------------------------------------- the shim


def shell_word(arg: str) -> str:
    """``arg`` as one shell word, its ``$(VAR)`` references expanded by the shell as Kubernetes would."""
    parts, last = [], 0
    for match in _VAR.finditer(arg):
        parts += [shlex.quote(arg[last : match.start()]) if match.start() > last else "", f'"${{{match[1]}}}"']
        last = match.end()
    if last < len(arg) or not parts:
        parts.append(shlex.quote(arg[last:]))
    return "".join(p for p in parts if p)


def for_podman(container: dict[str, Any]) -> None:
    expand_in_shell(container)
    container.pop("ports", None)


def expand_in_shell(container: dict[str, Any]) -> None:
    words = container.get("command", []) + container.get("args", [])
    if any(_VAR.search(w) for w in words):
        container["command"] = ["/bin/sh", "-c", "exec " + " ".join(shell_word(w) for w in words)]
        container.pop("args", None)


def set_metrics_port(container: dict[str, Any], port: int) -> None:
    for env in container["env"]:
        if env["name"] == "METRICS_PORT":
            env["value"] = str(port)
    for p in container["ports"]:
        if p["name"] == "metrics":
            p["containerPort"] = port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        command[command.index("--port") + 1] = str(port)


def shim(objects: list[dict[str, Any]], worker_ports: list[int]) -> tuple[list[dict[str, Any]], list[str]]:
    """What podman kube play runs, and the kinds left out."""
    out: list[dict[str, Any]] = []
    dropped: list[str] = []
    for obj in objects:
        kind = obj["kind"]
        if kind in ("ConfigMap", "Deployment"):
            if kind == "Deployment":
                assert obj["spec"]["replicas"] == 1, "host network: one replica per Deployment"
                for c in obj["spec"]["template"]["spec"]["containers"]:
                    for_podman(c)
                for_podman_pod(obj["spec"]["template"]["metadata"])
            out.append(obj)
        elif kind == "StatefulSet":
            template = obj["spec"]["template"]
            worker = template["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"
            replicas = obj["spec"].get("replicas", 1)
            if worker:
                assert replicas == len(worker_ports)
            for i in range(replicas):
                spec = copy.deepcopy(template["spec"])
                for claim in obj["spec"].get("volumeClaimTemplates", []):
                    spec.setdefault("volumes", []).append({"name": claim["metadata"]["name"], "emptyDir": {}})
                for c in spec["containers"]:
                    if worker:
                        set_metrics_port(c, worker_ports[i])
                    for_podman(c)
                metadata = {**copy.deepcopy(template["metadata"]), "name": f"{obj['metadata']['name']}-{i}"}
                for_podman_pod(metadata)
                out.append({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec})
        else:
            dropped.append(kind)
    return out, sorted(set(dropped))


def for_podman_pod(metadata: dict[str, Any]) -> None:
    annotations = metadata.get("annotations", {})
    for key, value in annotations.items():
        annotations[key] = value[:63]


def pod_names(docs: list[dict[str, Any]]) -> list[str]:
    """The pods podman kube play makes: a Pod's name, a Deployment's ``<name>-pod-0``."""
    names = []
    for doc in docs:
        if doc["kind"] == "Pod":
            names.append(doc["metadata"]["name"])
        elif doc["kind"] == "Deployment":
            names.append(f"{doc['metadata']['name']}-pod-0")
    return names


def probes(docs: list[dict[str, Any]]) -> dict[str, list[str]]:
    """container name (podman's: <pod>-<container>) -> its readiness probe command."""
    out = {}
    for doc, pod in zip([d for d in docs if d["kind"] in ("Pod", "Deployment")], pod_names(docs), strict=False):
        spec = doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]
        for c in spec["containers"]:
            out[f"{pod}-{c['name']}"] = c["readinessProbe"]["exec"]["command"]
    return out


# ---------------------------------------------------------------- the run


class Smoke:
    def __init__(self, helm: str, workdir: Path):
        self.helm, self.workdir = helm, workdir
        self.podman = Podman(workdir)
        self.release = "smoke" + secrets.token_hex(3)
        self.password = secrets.token_hex(16)
        self.users = {s: secrets.token_hex(16) for s in SERVICES}
        self.redis_port = free_port()
        self.worker_ports = [free_port() for _ in range(2)]
        self.gateway_port = free_port()
        self.api_key = secrets.token_hex(16)
        self.secret_names = {"redis": f"{self.release}-redis", "gateway": f"{self.release}-gateway"}
        self.keys = Keys("diffserve")
        self.docs: list[dict[str, Any]] = []
        self.played: Path | None = None

    def overrides(self) -> tuple[str, ...]:
        return (
            "hostNetwork=true",
            f"image.control.repository={CONTROL_IMAGE.rsplit(':', 1)[0]}",
            "image.control.tag=latest",
            f"redis.inChart.image.repository={REDIS_IMAGE.rsplit(':', 1)[0]}",
            "redis.inChart.image.tag=bookworm",
            f"redis.inChart.port={self.redis_port}",
            "redis.acl.enabled=true",
            f"redis.existingSecret={self.secret_names['redis']}",
            f"gateway.apiKeys.existingSecret={self.secret_names['gateway']}",
            f"gateway.port={self.gateway_port}",
            f"router.metricsPort={free_port()}",
            f"controller.metricsPort={free_port()}",
            f"gateway.metricsPort={free_port()}",
            f"discriminator.metricsPort={free_port()}",
            f"workers.metricsPort={self.worker_ports[0]}",
            f"workers.replicas={len(self.worker_ports)}",
            f"settings.DIFFSERVE_TIME_SCALE={TIME_SCALE}",
            f"extraSettings.DIFFSERVE_RECLAIM_IDLE_MS={RECLAIM_IDLE_MS}",
        )

    def create_secrets(self) -> None:
        def b64(text: str) -> str:
            return base64.b64encode(text.encode()).decode()

        redis_data = {"password": b64(self.password), **{f"{s}-password": b64(p) for s, p in self.users.items()}}
        gateway_data = {"api-keys": b64(f"smoke:{hashlib.sha256(self.api_key.encode()).hexdigest()}")}
        for name, data in ((self.secret_names["redis"], redis_data), (self.secret_names["gateway"], gateway_data)):
            path = self.workdir / f"{name}.json"
            path.write_text(json.dumps(data))
            path.chmod(0o600)
            self.podman("secret", "create", name, str(path))
            path.unlink()

    def play(self) -> tuple[int, list[str]]:
        objects = C.render(self.helm, C.CHART, C.values_files("cpu"), self.overrides(), self.release)
        self.docs, dropped = shim(objects, self.worker_ports)
        self.played = self.workdir / "played.yaml"
        self.played.write_text(yaml.safe_dump_all(self.docs, sort_keys=False))
        self.podman("kube", "play", str(self.played), timeout=600)
        return len(pod_names(self.docs)), dropped

    def wait_healthy(self, only: set[str] | None = None, timeout: float = 180) -> None:
        """Until every container's readiness probe (or those of ``only``) passes."""
        deadline = time.monotonic() + timeout
        pending = {name: probe for name, probe in probes(self.docs).items() if only is None or name in only}
        while pending:
            for name, command in list(pending.items()):
                state = self.podman("inspect", "--format", "{{.State.Status}}", name, check=False).stdout.strip()
                if state not in ("running", "created", "configured", ""):
                    logs = self.podman("logs", "--tail", "20", name, check=False)
                    raise SystemExit(f"chart-smoke: {name} is {state}:\n{logs.stdout[-2000:]}{logs.stderr[-2000:]}")
                if self.podman("exec", name, *command, check=False).returncode == 0:
                    del pending[name]
            if pending and time.monotonic() > deadline:
                raise SystemExit(f"chart-smoke: not healthy after {timeout:.0f} s: {sorted(pending)}")
            time.sleep(0.5)

    def worker_pod(self, i: int) -> dict[str, Any]:
        name = f"{self.release}-diffserve-worker-{i}"
        return next(d for d in self.docs if d["metadata"]["name"] == name)

    def replay_worker(self, i: int) -> None:
        """The StatefulSet's controller recreating a dead pod under its name."""
        config_maps = [d for d in self.docs if d["kind"] == "ConfigMap"]
        path = self.workdir / f"worker-{i}.yaml"
        path.write_text(yaml.safe_dump_all([*config_maps, self.worker_pod(i)], sort_keys=False))
        self.podman("kube", "play", str(path))

    def teardown(self) -> list[str]:
        problems = []
        for name in probes(self.docs):  # each container's log, kept with the run
            out = self.podman("logs", name, check=False)
            (self.workdir / f"{name}.log").write_text(out.stdout + out.stderr)
        if self.played is not None:
            self.podman("kube", "down", str(self.played), check=False, timeout=300)
        for pod in pod_names(self.docs):  # a pod kube down missed (the replayed worker)
            if self.podman("pod", "exists", pod, check=False).returncode == 0:
                self.podman("pod", "rm", "-f", "-t", "10", pod, check=False)
        for name in self.secret_names.values():
            self.podman("secret", "rm", name, check=False)
        left = self.podman("ps", "-a", "--filter", f"name={self.release}", "--format", "{{.Names}}", check=False)
        if left.stdout.strip():
            problems.append(f"left running: {left.stdout.split()}")
        busy = [p for p in [self.redis_port, *self.worker_ports] if tools.smoke.port_busy(p)]
        if busy:
            problems.append(f"ports still in use: {busy}")
        return problems


def through_gateway(smoke: Smoke, n: int, problems: list[str]) -> int:
    """``n`` images through the gateway's OpenAI images API; a request without the key is refused."""
    url = f"http://127.0.0.1:{smoke.gateway_port}/v1/images/generations"

    async def generate() -> int:
        async with httpx.AsyncClient(timeout=120) as http:
            refused = await http.post(url, json={"prompt": "a cat"})
            if refused.status_code != 401:
                problems.append(f"gateway: no API key got {refused.status_code}, not 401")
            headers = {"Authorization": f"Bearer {smoke.api_key}"}
            replies = await asyncio.gather(
                *(http.post(url, json={"prompt": f"a red kite {i}"}, headers=headers) for i in range(n))
            )
        ok = 0
        for reply in replies:
            if reply.status_code == 200 and base64.b64decode(reply.json()["data"][0]["b64_json"]):
                ok += 1
            else:
                problems.append(f"gateway: {reply.status_code} {reply.text[:200]}")
        return ok

    return asyncio.run(generate())


def holding_worker(smoke: Smoke, r: redis.Redis, *, deadline: float) -> tuple[str, int, str]:
    """(worker pod, entries it holds, queue) of the first worker seen holding entries; ("", 0, "") by the deadline."""
    keys = smoke.keys
    while time.monotonic() < deadline:
        for i in range(len(smoke.worker_ports)):
            name = f"{smoke.release}-diffserve-worker-{i}"
            for stream in (keys.light_queue, keys.heavy_queue):
                if (count := tools.smoke.pending_of(r, stream, name)) > 0:
                    return name, count, stream
        time.sleep(0.02)
    return "", 0, ""


def run_jobs(smoke: Smoke, summary: dict[str, str], problems: list[str]) -> None:
    url = f"redis://:{smoke.password}@127.0.0.1:{smoke.redis_port}/0"  # the admin (default) user
    r = redis.Redis.from_url(url)
    keys = smoke.keys
    sent = answered = 0
    cli_ids = [f"smoke-xadd-{i}" for i in range(20)]  # 1. plain fields, as redis-cli would
    for job_id in cli_ids:
        r.xadd(keys.jobs, {"job_id": job_id, "prompt": f"a lighthouse at dusk, number {job_id}"})
    sent += len(cli_ids)
    answered += tools.smoke.list_answers(r, keys, cli_ids, 120, problems)

    answered += through_gateway(smoke, 10, problems)  # 2. HTTP, with the API key from the Secret
    sent += 10
    answered += tools.smoke.through_client(url, 10, problems)  # 3. the Python client, reply streams
    sent += 10
    burst = tools.smoke.enqueue(url, 60)  # 4. a burst, and a worker pod killed while it holds entries
    sent += len(burst)
    victim, held, queue = holding_worker(smoke, r, deadline=time.monotonic() + 30)
    if not held:
        problems.append("no worker held entries during the burst: the reclaim path was not exercised")
    else:
        smoke.podman("pod", "kill", "-s", "KILL", victim)
        smoke.podman("pod", "rm", "-f", victim)
        tools.smoke.log(NAME, f"killed {victim} holding {held} entries of {queue}")
        time.sleep(2)
        smoke.replay_worker(int(victim.rsplit("-", 1)[1]))
        smoke.wait_healthy({f"{victim}-worker"})
    answered += tools.smoke.list_answers(r, keys, burst, 180, problems)
    left = tools.smoke.pending_of(r, queue, victim) if held else 0
    if left:
        problems.append(f"{victim} still has {left} pending entries")
    if held:
        outcome = "all reclaimed" if not left else f"{left} left pending"
        summary["kill"] = f"{victim} killed holding {held} entries, recreated under its name (healthy), {outcome}"
    summary["jobs"] = f"sent {sent}, answered {answered}, lost {sent - answered}"
    r.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="make chart-smoke: the CPU values' pods with podman kube play")
    parser.add_argument("--helm", default="helm")
    parser.add_argument("--no-build", action="store_true", help="use the images podman already has")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("chart-smoke: run as root (it installs packages and runs podman)")
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="diffserve-chart-smoke."))
    tools.smoke.install_missing(NAME, PACKAGES)
    smoke = Smoke(args.helm, workdir)
    summary: dict[str, str] = {}
    problems: list[str] = []
    try:
        if not args.no_build:
            t = time.monotonic()
            build = subprocess.run(
                [str(ROOT / "compose" / "build-offline.sh")],
                cwd=ROOT,
                capture_output=True,
                text=True,
                env={**smoke.podman.env, "ENGINE": "podman"},
                timeout=1800,
            )
            (workdir / "build.log").write_text(build.stdout + build.stderr)
            if build.returncode != 0:
                raise SystemExit(f"chart-smoke: build-offline.sh failed (log: {workdir}/build.log)")
            built = [line.split(": ", 1)[1] for line in build.stdout.splitlines() if line.endswith(" MB")]
            summary["images"] = ", ".join(built) + f" (podman build {time.monotonic() - t:.0f} s)"
        smoke.create_secrets()
        t = time.monotonic()
        pods, dropped = smoke.play()
        smoke.wait_healthy()
        summary["healthy"] = f"{pods} pods healthy {time.monotonic() - t:.1f} s after kube play"
        summary["shim"] = f"StatefulSets as Pods; not played: {', '.join(dropped)} (need a cluster)"
        tools.smoke.log(NAME, summary["healthy"])
        run_jobs(smoke, summary, problems)
    finally:
        leftovers = smoke.teardown()
        problems += leftovers
        summary["after"] = "; ".join(leftovers) or "no pod, container or secret of the release left; its ports free"
    return tools.smoke.report(NAME, started, summary, problems, workdir)


if __name__ == "__main__":
    sys.exit(main())
