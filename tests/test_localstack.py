"""A local stack never outlives the process that started it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

STARTER = """
import sys, time
from common.localstack import LocalStack, StackSpec
stack = LocalStack(StackSpec(light_workers=1, heavy_workers=0), sys.argv[1]).start()
print(stack.redis.pidfile.read_text().strip(), *[p.pid for p in stack.procs.values()], flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent's wait() is missing.
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.slow
def test_a_local_stack_goes_away_when_its_parent_is_sigkilled(tmp_path):
    parent = subprocess.Popen(
        [sys.executable, "-c", STARTER, str(tmp_path / "logs")], stdout=subprocess.PIPE, text=True
    )
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 4 and all(_alive(p) for p in pids)  # redis, router, discriminator, worker
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in pids if _alive(p)]
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()


@pytest.mark.slow
def test_a_stack_that_does_not_come_up_stops_what_it_started(tmp_path):
    from common.localstack import LocalStack, StackSpec

    stack = LocalStack(StackSpec(light_workers=1, heavy_workers=0), str(tmp_path))
    stack.spec.env["DIFFSERVE_CASCADE"] = "no-such-cascade"  # every service refuses it and exits
    with pytest.raises(RuntimeError, match="exited"):
        stack.start(ready_timeout=60)
    assert stack.procs and all(p.poll() is not None for p in stack.procs.values())
    assert stack.redis is not None and not stack.redis.pidfile.exists()  # its redis-server shut down too


def test_free_ports_are_below_the_range_the_kernel_gives_client_connections():
    from common.localstack import _ephemeral_low, free_port

    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50 and all(1024 <= p < _ephemeral_low() for p in ports)
