"""``make compose-test``: the CPU compose stack in real containers, end to end, on one machine with no
registry and loopback-only networking (opt-in, as root; not part of CI).

It installs docker.io, docker-compose and debootstrap if missing, starts a dockerd if none answers
(and stops only that one), builds the images with compose/build-offline.sh, starts
docker-compose.yml + docker-compose.cpu.yml + docker-compose.hostnet.yml (merged here: Compose v1
has no ``!reset``), waits for every health check, pushes jobs with ``redis-cli XADD`` from the host
and through the Python client, kills a worker container in the middle of a burst, checks that every
job is answered exactly once with a decodable image, and tears the stack down with ``down -v``.
Prints a summary and exits non-zero on any failure."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import redis
import yaml

from common.config import Keys
from common.localstack import free_port
from tools import smoke
from tools.compose_files import absolute_paths, load, merge

COMPOSE = Path(__file__).resolve().parent
ROOT = COMPOSE.parent
PROJECT = "diffserve-e2e"
BASE_IMAGE = "diffserve-base:bookworm"  # also the Redis image: it has redis-server
PROMETHEUS_IMAGE = "diffserve-prometheus:bookworm"  # build-offline.sh, from Debian's package
GRAFANA_WHY = "grafana/grafana is not packaged by Debian and no registry answers"
KEYS = Keys("diffserve")  # DIFFSERVE_NAMESPACE in diffserve.env
TIME_SCALE = "0.2"  # profiled latencies 5x faster: heavy batches still take a second or more
RECLAIM_IDLE_MS = "3000"
NAME = "compose-test"
# tool -> the Debian package that has it, installed where missing
PACKAGES = {
    "dockerd": "docker.io",
    "docker-compose": "docker-compose",
    "debootstrap": "debootstrap",
    "redis-cli": "redis-tools",
}


def sh(*cmd: str, check: bool = True, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and result.returncode != 0:
        raise SystemExit(
            f"compose-test: {' '.join(cmd[:4])} failed ({result.returncode}):\n"
            f"{result.stdout[-3000:]}{result.stderr[-3000:]}"
        )
    return result


class Dockerd:
    """The engine: the one already running, or one started here (and stopped here, by its pid)."""

    def __init__(self, workdir: Path):
        self.proc: subprocess.Popen | None = None
        self.had_docker0 = Path("/sys/class/net/docker0").exists()
        self.workdir = workdir

    def up(self) -> None:
        if sh("docker", "info", check=False).returncode == 0:
            smoke.log(NAME, "using the Docker engine that is already running")
            return
        smoke.log(NAME, "starting dockerd --bridge=none --iptables=false")
        with open(self.workdir / "dockerd.log", "w") as dockerd_log:  # dockerd has its own copy
            self.proc = subprocess.Popen(
                ["dockerd", "--bridge=none", "--iptables=false"], stdout=dockerd_log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 60
        while sh("docker", "info", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(
                    "compose-test: dockerd did not start:\n" + (self.workdir / "dockerd.log").read_text()[-2000:]
                )
            time.sleep(0.5)

    def down(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if not self.had_docker0 and Path("/sys/class/net/docker0").exists():
            sh("ip", "link", "delete", "docker0", check=False)


def stack_file(workdir: Path, images: set[str]) -> tuple[Path, list[str]]:
    """The CPU stack with host networking, merged as Compose v2 would, plus the test's timings."""
    tree = merge(
        merge(load(COMPOSE / "docker-compose.yml"), load(COMPOSE / "docker-compose.cpu.yml")),
        load(COMPOSE / "docker-compose.hostnet.yml"),
    )
    notes = []
    if PROMETHEUS_IMAGE not in images:
        del tree["services"]["prometheus"]
        notes.append(f"prometheus (no {PROMETHEUS_IMAGE} image)")
    # The dashboard needs Grafana's image; the compose file keeps it for hosts that can pull it.
    if tree["services"]["grafana"]["image"] not in images:
        del tree["services"]["grafana"]
        notes.append(f"grafana ({GRAFANA_WHY})")
    del tree["services"]["models"]  # profile `setup`, one-shot model download: nothing to download here
    for svc in tree["services"].values():
        if svc.get("build", {}).get("target") != "control":
            continue
        svc["environment"].update(DIFFSERVE_TIME_SCALE=TIME_SCALE, DIFFSERVE_RECLAIM_IDLE_MS=RECLAIM_IDLE_MS)
        svc["healthcheck"].update(interval="2s", start_period="60s")  # healthy soon after ready, not 10 s later
    path = workdir / "docker-compose.e2e.yml"
    path.write_text(yaml.safe_dump(absolute_paths(tree, COMPOSE), sort_keys=False))
    return path, notes


class Stack:
    def __init__(self, file: Path, env_file: Path):
        self.base = [
            "docker-compose",
            "-p",
            PROJECT,
            "--env-file",
            str(env_file),
            "--project-directory",
            str(COMPOSE),
            "-f",
            str(file),
        ]

    def compose(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        return sh(*self.base, *args, check=check, timeout=timeout, cwd=COMPOSE)

    def containers(self) -> dict[str, str]:
        """service -> container id."""
        out = {}
        for cid in self.compose("ps", "-q").stdout.split():
            name = sh(
                "docker", "inspect", "--format", '{{index .Config.Labels "com.docker.compose.service"}}', cid
            ).stdout.strip()
            out[name] = cid
        return out

    def wait_healthy(self, services: set[str], timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while True:
            states = {}
            for name, cid in self.containers().items():
                states[name] = sh(
                    "docker",
                    "inspect",
                    "--format",
                    "{{.State.Status}}/{{if .State.Health}}{{.State.Health.Status}}{{end}}",
                    cid,
                ).stdout.strip()
            if set(states) >= services and all(s == "running/healthy" for s in states.values()):
                return
            if time.monotonic() > deadline:
                logs = self.compose("logs", "--tail", "30", check=False).stdout
                raise SystemExit(f"compose-test: not healthy after {timeout:.0f} s: {states}\n{logs[-4000:]}")
            time.sleep(1)


def scraped(problems: list[str], timeout: float = 30) -> str:
    """Prometheus (5 s scrape interval) sees every service's metrics endpoint up."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen("http://127.0.0.1:9090/api/v1/targets", timeout=5) as resp:
                targets = json.load(resp)["data"]["activeTargets"]
        except OSError:
            targets = []
        up = sorted(t["labels"]["job"] for t in targets if t["health"] == "up")
        if targets and len(up) == len(targets):
            return f"{len(up)}/{len(targets)} targets up ({', '.join(up)})"
        if time.monotonic() > deadline:
            problems.append(f"prometheus: only {len(up)} of {len(targets)} targets up")
            return f"{len(up)}/{len(targets)} targets up"
        time.sleep(1)


def main() -> int:
    if os.geteuid() != 0:
        raise SystemExit("compose-test: run as root (it installs packages and starts dockerd)")
    started = time.monotonic()
    summary: dict[str, str] = {}
    problems: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="diffserve-compose-test."))
    smoke.install_missing(NAME, PACKAGES)
    dockerd = Dockerd(workdir)
    stack = None
    try:
        dockerd.up()
        busy = [p for p in (8000, 9090, 9101, 9102, 9103, 9104, 9110, 9111) if smoke.port_busy(p)]
        if busy:
            raise SystemExit(f"compose-test: metrics ports {busy} are in use on 127.0.0.1")
        file, notes = build(workdir, summary)
        password, redis_port = secrets.token_hex(16), free_port()
        env_file = workdir / ".env"
        env_file.write_text(
            f"REDIS_PASSWORD={password}\nGRAFANA_ADMIN_PASSWORD={secrets.token_hex(8)}\n"
            f"GATEWAY_API_KEYS=compose-test:{hashlib.sha256(secrets.token_bytes(16)).hexdigest()}\n"
            f"REDIS_PORT={redis_port}\nREDIS_IMAGE={BASE_IMAGE}\n"
            f"PROMETHEUS_IMAGE={PROMETHEUS_IMAGE}\n"
        )
        stack = Stack(file, env_file)
        services = set(yaml.safe_load(file.read_text())["services"])
        t = time.monotonic()
        stack.compose("up", "-d", "--no-build")
        stack.wait_healthy(services)
        summary["healthy"] = f"{len(services)} services healthy {time.monotonic() - t:.1f} s after up"
        smoke.log(NAME, summary["healthy"])
        exercise(stack, password, redis_port, summary, problems)
        if "prometheus" in services:
            summary["prometheus"] = scraped(problems)
        summary["not run"] = "; ".join(notes) or "nothing"
    finally:
        if stack is not None:
            down = stack.compose("down", "-v", check=False, timeout=300)
            if down.returncode != 0:
                problems.append(f"docker-compose down -v failed: {down.stderr[-500:]}")
        dockerd.down()
    return smoke.report(NAME, started, summary, problems, workdir)


def build(workdir: Path, summary: dict[str, str]) -> tuple[Path, list[str]]:
    """The images, built offline, and the compose file of what can run here (and what cannot, why)."""
    t = time.monotonic()
    built_log = sh(str(COMPOSE / "build-offline.sh"), cwd=ROOT, timeout=1800)
    (workdir / "build.log").write_text(built_log.stdout + built_log.stderr)
    built = [
        line.split(": ", 1)[1]
        for line in built_log.stdout.splitlines()
        if line.startswith("build-offline: ") and line.endswith(" MB")
    ]
    summary["images"] = ", ".join(built) + f" (build {time.monotonic() - t:.0f} s)"
    images = set(sh("docker", "images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split())
    file, notes = stack_file(workdir, images)
    for note in notes:
        smoke.log(NAME, f"not run: {note}")
    return file, notes


def exercise(stack: Stack, password: str, redis_port: int, summary: dict[str, str], problems: list[str]) -> None:
    """Jobs three ways (redis-cli, the client, a burst with the light worker killed), every one answered once."""
    url = f"redis://:{password}@127.0.0.1:{redis_port}/0"
    r = redis.Redis.from_url(url)
    sent = answered = 0
    # 1. redis-cli XADD from the host, plain fields, answers on the result lists.
    cli_ids = [f"e2e-cli-{i}" for i in range(20)]
    for job_id in cli_ids:
        sh(
            "redis-cli",
            "-p",
            str(redis_port),
            "--no-auth-warning",
            "-a",
            password,
            "XADD",
            KEYS.jobs,
            "*",
            "job_id",
            job_id,
            "prompt",
            f"a lighthouse at dusk, number {job_id}",
        )
    sent += len(cli_ids)
    answered += smoke.list_answers(r, KEYS, cli_ids, 120, problems)
    # 2. The Python client: reply streams.
    answered += smoke.through_client(url, 20, problems)
    sent += 20
    burst_sent, burst_answered = kill_a_worker_in_a_burst(stack, r, url, summary, problems)
    sent, answered = sent + burst_sent, answered + burst_answered
    summary["jobs"] = f"sent {sent}, answered {answered}, lost {sent - answered}"
    r.close()


def kill_a_worker_in_a_burst(
    stack: Stack, r: redis.Redis, url: str, summary: dict[str, str], problems: list[str]
) -> tuple[int, int]:
    """3. A burst, and the light worker's container killed while it holds entries: (sent, answered)."""
    burst = smoke.enqueue(url, 60)
    deadline = time.monotonic() + 30
    while (held := smoke.pending_of(r, KEYS.light_queue, "worker-0")) == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    victim = stack.containers()["worker-0"]
    sh("docker", "kill", victim)
    smoke.log(NAME, f"killed worker-0 holding {held} light entries")
    time.sleep(2)
    restarted = "by its restart policy"
    if sh("docker", "inspect", "--format", "{{.State.Running}}", victim).stdout.strip() != "true":
        stack.compose("start", "worker-0")  # what a supervisor does after a crash
        restarted = "with docker-compose start"
    answered = smoke.list_answers(r, KEYS, burst, 180, problems)
    if held == 0:
        problems.append("worker-0 held no entries when killed: the reclaim path was not exercised")
    left = smoke.pending_of(r, KEYS.light_queue, "worker-0")
    if left:
        problems.append(f"worker-0 still has {left} pending light entries")
    summary["kill"] = f"worker-0 killed holding {held} light entries, restarted {restarted}, " + (
        "all reclaimed" if held and not left else f"{left} left pending"
    )
    return len(burst), answered


if __name__ == "__main__":
    sys.exit(main())
