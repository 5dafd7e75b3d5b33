"""Issue 24 (reliability round three), the service side: lost submission replies, a hung Redis at
shutdown, loopback metrics, stalled workers past the result TTL. Real redis-server, real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from common.config import Keys
from common.localstack import LocalStack, StackSpec, free_port

KEYS = Keys()


@pytest.mark.slow
def test_services_stop_within_seconds_of_sigterm_while_redis_hangs(redis_server, tmp_path):
    """Redis stops answering (SIGSTOP) under a router and a discriminator blocked in reads. Each command
    waited out socket timeout x retries (~40 s) before SIGTERM took effect; now ~5 s grace, then out."""
    spec = StackSpec(redis_url=redis_server.url, light_workers=0, heavy_workers=0)
    pid = int(redis_server.pidfile.read_text())
    with LocalStack(spec, str(tmp_path / "logs")) as stack:
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(1.0)  # every loop is now waiting on the hung server
            start = time.monotonic()
            for proc in stack.procs.values():
                proc.send_signal(signal.SIGTERM)
            took = {}
            for name, proc in stack.procs.items():
                proc.wait(timeout=60)
                took[name] = time.monotonic() - start
        finally:
            os.kill(pid, signal.SIGCONT)
    assert all(seconds < 8 for seconds in took.values()), took


@pytest.mark.slow
def test_a_standalone_service_serves_metrics_on_loopback_unless_told_otherwise(redis_server, tmp_path):
    """``diffserve router`` with a metrics port and no METRICS_ADDR listens on 127.0.0.1 only."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "METRICS_ADDR"}
    env.update(REDIS_URL=redis_server.url, METRICS_PORT=str(port), PYTHONPATH=os.getcwd())
    proc = subprocess.Popen([sys.executable, "-m", "services.router"], env=env, stdout=subprocess.DEVNULL)
    try:
        deadline, bound = time.monotonic() + 20, set()
        while time.monotonic() < deadline and not bound:
            listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout
            bound = {line.split()[3] for line in listening.splitlines() if line.split()[3].endswith(f":{port}")}
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert bound == {f"127.0.0.1:{port}"}, bound
