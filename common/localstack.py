"""A local stack of real processes: its own redis-server (unless given a URL), a router,
a discriminator, workers and optionally the controller and the HTTP gateway, each started as
``python -m services.<name>``.  ``diffserve up``, the load tester and the tests use it."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import health

_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    """The lowest port the kernel gives outgoing connections (Linux; 32768 elsewhere, the usual floor)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port nothing listens on now, and not one this process handed out before (two ports asked
    for in a row, before either is bound, must differ).  Drawn below the ephemeral range: a port the kernel
    picked (bind to 0) is one it may give a client connection before the service binds it."""
    high = _ephemeral_low()
    low = max(1024, high - 20_000)
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(low, high) if high - low >= 1000 else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # taken
                continue
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free loopback port")


class RedisServer:
    """A throwaway redis-server on a free loopback port."""

    def __init__(
        self,
        *,
        port: int | None = None,
        password: str | None = None,
        appendonly: bool = False,
        workdir: str | None = None,
        tls: tuple[str, str, str] | None = None,
    ):
        """``tls``: (certificate, key, CA) files; the server then speaks TLS only."""
        if not shutil.which("redis-server"):
            raise RuntimeError("redis-server not found: install it (Debian: apt-get install -y redis-server)")
        self.port = port or free_port()
        self.password = password
        self.appendonly = appendonly
        self.tls = tls
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="diffserve-redis-"))
        self.pidfile = self.dir / "redis.pid"

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        listen = (
            [
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--tls-cert-file",
                self.tls[0],
                "--tls-key-file",
                self.tls[1],
                "--tls-ca-cert-file",
                self.tls[2],
                "--tls-auth-clients",
                "no",
            ]
            if self.tls
            else ["--port", str(self.port)]
        )
        args = [
            "redis-server",
            *listen,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--dir",
            str(self.dir),
            "--daemonize",
            "yes",
            "--pidfile",
            str(self.pidfile),
            "--logfile",
            str(self.dir / "redis.log"),
        ]
        if self.password:
            args += ["--requirepass", self.password]
        subprocess.run(args, check=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._cli("ping").stdout.strip() == "PONG":
                return self
            time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def _cli(self, *cmd: str) -> subprocess.CompletedProcess[str]:
        auth = ["--no-auth-warning", "-a", self.password] if self.password else []
        tls = ["--tls", "--cacert", self.tls[2]] if self.tls else []
        return subprocess.run(["redis-cli", "-p", str(self.port), *tls, *auth, *cmd], capture_output=True, text=True)

    def cli(self, *cmd: str) -> str:
        """Run a redis-cli command against this server (as the default user); its output."""
        out: str = self._cli(*cmd).stdout
        return out.strip()

    def stop(self) -> None:
        self._cli("shutdown", "nosave")
        deadline = time.monotonic() + 5
        while (
            time.monotonic() < deadline
            and self._cli("ping").returncode == 0
            and self._cli("ping").stdout.strip() == "PONG"
        ):
            time.sleep(0.05)

    def restart(self, down_s: float = 0.5) -> None:
        """Stop and start on the same port (with AOF on, the data survives)."""
        if self.appendonly:
            self._cli("bgrewriteaof")
            time.sleep(0.2)
        self.stop()
        time.sleep(down_s)
        self.start()


@dataclass(kw_only=True)
class StackSpec:
    backend: str = "profiled"
    cascade: str = "sdturbo-sdv15"
    light_workers: int = 1
    heavy_workers: int = 1
    controller: bool = False
    policy: str = "diffserve"
    time_scale: float = 1.0
    redis_url: str | None = None
    namespace: str = "diffserve"
    model_dir: str | None = None
    env: dict[str, str] = field(default_factory=dict)  # extra DIFFSERVE_* settings for every service
    controller_args: list[str] = field(default_factory=list)
    metrics_base_port: int = 0  # >0: each service gets its own port from here up; 0: free ports
    gateway_port: int = 0  # >0: also run the HTTP gateway on this port
    gateway_args: list[str] = field(default_factory=list)


# Run as ``python -c WATCHDOG PIDFILE`` with a pipe from the stack's process on stdin. The pipe
# closes when that process exits in any way (SIGKILL included; the stack never closes it itself),
# and the watchdog then stops every pid the stack listed. A parent-death signal (PR_SET_PDEATHSIG)
# would fire when the starting *thread* ends, and redis-server daemonizes; this covers both.
WATCHDOG = """
import os, signal, sys, time
sys.stdin.buffer.read()
pids = [int(p) for p in open(sys.argv[1]).read().split()]
for sig, pause in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 0.0)):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    end = time.monotonic() + pause
    while time.monotonic() < end and any(os.path.exists(f"/proc/{p}") for p in pids):
        time.sleep(0.1)
"""


class LocalStack:
    def __init__(self, spec: StackSpec, log_dir: str | None = None):
        self.spec = spec
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="diffserve-stack-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.redis: RedisServer | None = None
        self.redis_url = spec.redis_url
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._commands: dict[str, list[str]] = {}
        self._extra_env: dict[str, dict[str, str]] = {}  # process name -> settings of its own
        self.metrics_ports: dict[str, int] = {}  # process name -> its metrics (and readiness) port
        self._services: dict[str, str] = {}  # process name -> the service it runs (its readiness label)
        self._watchdog: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _env(self, name: str) -> dict[str, str]:
        if self.redis_url is None:
            raise RuntimeError("start the stack (its Redis) before its services")
        env = {
            **os.environ,
            "REDIS_URL": self.redis_url,
            "DIFFSERVE_NAMESPACE": self.spec.namespace,
            "DIFFSERVE_BACKEND": self.spec.backend,
            "DIFFSERVE_CASCADE": self.spec.cascade,
            "DIFFSERVE_TIME_SCALE": str(self.spec.time_scale),
            "DIFFSERVE_INSTANCE_ID": name,
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
            **self.spec.env,
        }
        if self.spec.model_dir:
            env["DIFFSERVE_MODEL_DIR"] = self.spec.model_dir
        env.setdefault("METRICS_ADDR", "127.0.0.1")  # a local stack: nothing to serve to other hosts
        env["METRICS_PORT"] = str(self._metrics_port(name))
        return env

    def _metrics_port(self, name: str) -> int:
        """Every process serves metrics (readiness is read there); a restart keeps its port."""
        if name not in self.metrics_ports:
            if self.spec.metrics_base_port:
                port = self.spec.metrics_base_port + len(self.metrics_ports)
            else:
                port = free_port()
            self.metrics_ports[name] = port
        return self.metrics_ports[name]

    def spawn(self, name: str, module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``python -m services.<module> args`` as ``name``; ``env``: settings for this process only
        (kept for its restarts)."""
        self._commands[name] = [sys.executable, "-m", f"services.{module}", *args]
        self._services[name] = module
        self._extra_env[name] = dict(env or {})
        return self._launch(name)

    def _launch(self, name: str) -> subprocess.Popen[bytes]:
        with open(self.log_dir / f"{name}.log", "ab") as log:  # the process has its own copy of the file
            proc = subprocess.Popen(
                self._commands[name],
                env={**self._env(name), **self._extra_env.get(name, {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=Path(__file__).resolve().parent.parent,
            )
        self.procs[name] = proc
        self._watch(proc.pid)
        return proc

    def _watch(self, pid: int) -> None:
        """Have the watchdog stop ``pid`` should this process die without stopping the stack."""
        if self._watchdog is None:
            self._watchdog = subprocess.Popen(
                [sys.executable, "-c", WATCHDOG, str(self.log_dir / "stack.pids")],
                stdin=subprocess.PIPE,
                start_new_session=True,
            )
        with open(self.log_dir / "stack.pids", "a") as fh:
            fh.write(f"{pid}\n")

    def start(self, ready_timeout: float = 120.0) -> LocalStack:
        try:
            self._start(ready_timeout)
        except BaseException:  # a service that did not come up: stop the others (no orphans, no leaked pipes)
            self.stop()
            raise
        return self

    def _start(self, ready_timeout: float) -> None:
        if not self.redis_url:
            self.redis = RedisServer().start()
            self.redis_url = self.redis.url
            self._watch(int(self.redis.pidfile.read_text()))
        self.spawn("router", "router")
        self.spawn("discriminator", "discriminator")
        for i in range(self.spec.light_workers):
            self.spawn(f"worker-{i}", "worker", "--role", "light")
        for i in range(self.spec.heavy_workers):
            self.spawn(f"worker-{self.spec.light_workers + i}", "worker", "--role", "heavy")
        if self.spec.controller:
            self.spawn("controller", "controller", "--policy", self.spec.policy, *self.spec.controller_args)
        if self.spec.gateway_port:
            self.spawn("gateway", "gateway", "--port", str(self.spec.gateway_port), *self.spec.gateway_args)
        self.wait_ready(list(self.procs), ready_timeout)

    def wait_ready(self, names: list[str], timeout: float = 120.0) -> None:
        """Wait until each process's health endpoint says ready (what compose's healthchecks ask too)."""
        deadline = time.monotonic() + timeout
        pending = set(names)
        while pending:
            for name in list(pending):
                if self.procs[name].poll() is not None:
                    raise RuntimeError(f"{name} exited: {self.log_tail(name)}")
                ready, _message = health.check("127.0.0.1", self.metrics_ports[name], 1.0, self._services[name])
                if ready:
                    pending.discard(name)
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready after {timeout}s: {sorted(pending)}")
            time.sleep(0.1)

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        proc.send_signal(sig)
        proc.wait(timeout=30)

    def restart(self, name: str, ready_timeout: float = 120.0) -> None:
        """Start a process again under its name (after kill) and wait until it is ready."""
        if self.procs[name].poll() is None:
            self.kill(name)
        self._launch(name)
        self.wait_ready([name], ready_timeout)

    def alive(self) -> dict[str, bool]:
        return {name: proc.poll() is None for name, proc in self.procs.items()}

    def stop(self, timeout: float = 20.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.redis:
            self.redis.stop()
        if self._watchdog:  # everything is stopped: let it exit with nothing left to do
            (self.log_dir / "stack.pids").write_text("")
            if self._watchdog.stdin is not None:
                self._watchdog.stdin.close()
            self._watchdog.wait()
            self._watchdog = None
