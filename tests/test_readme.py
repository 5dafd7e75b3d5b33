"""README's first commands, run literally in a fresh environment (own HOME and runtime folder, no
REDIS_URL): ``diffserve up``, then ``diffserve submit`` and the ``redis-cli`` lines as printed there,
reach the stack that ``up`` started; ``up`` prints the same redis-cli lines with its port."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from common.localstack import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def _first_commands() -> tuple[str, list[str]]:
    section = (REPO / "README.md").read_text().split("## First commands", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return blocks[0].strip(), [line for line in blocks[1].splitlines() if line.strip()]


def test_readme_first_commands_reach_the_stack_up_started(tmp_path):
    up, lines = _first_commands()
    assert up == "diffserve up" and lines[0].startswith("diffserve submit")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "diffserve"  # the console script, pointed at this checkout
    script.write_text(f'#!/bin/sh\nexec {sys.executable} -m diffserve "$@"\n')
    script.chmod(0o755)
    (tmp_path / "home").mkdir()
    (tmp_path / "run").mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "DIFFSERVE_"))}
    env.update(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        HOME=str(tmp_path / "home"),
        XDG_RUNTIME_DIR=str(tmp_path / "run"),
        PYTHONPATH=str(REPO),
        DIFFSERVE_GATEWAY_PORT=str(free_port()),  # 8000 may be taken on a shared machine
    )
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.Popen(
        ["bash", "-c", up],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    printed: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 180
        while not any(line.startswith("metrics (and readiness)") for line in printed):
            line = proc.stdout.readline()
            assert line and time.monotonic() < deadline, "".join(printed)
            printed.append(line)
        runs = [
            subprocess.run(["bash", "-c", line], cwd=work, env=env, capture_output=True, timeout=120) for line in lines
        ]
        for line, run in zip(lines, runs, strict=False):
            assert run.returncode == 0, (line, run.stdout[-500:], run.stderr[-2000:])
        assert b"answered by" in runs[0].stdout
        image = Image.open(io.BytesIO((work / "fox.png").read_bytes()))
        assert image.format == "PNG" and image.size == (512, 512)
        assert re.fullmatch(rb"\d+-\d+\n", runs[1].stdout)  # XADD's entry id
        assert b"final_result" in runs[2].stdout and b"j1" in runs[2].stdout  # BLPOP's msgpack answer
        # The other commands that default to the recorded stack: the load tester (and the stack's worker
        # count in its report, not its --workers default of 8) and the tenant admin.
        loadtest = subprocess.run(
            "diffserve loadtest --redis-url --rate 4 --duration 2 --no-plots --no-progress --out lt",
            shell=True,
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert loadtest.returncode == 0, loadtest.stderr[-2000:]
        meta = json.loads((work / "lt" / "report.json").read_text())["meta"]
        assert meta["workers"] == 4 and meta["sent"] > 0
        tenants = subprocess.run("diffserve tenant list", shell=True, cwd=work, env=env, capture_output=True)
        assert tenants.returncode == 0, tenants.stderr[-2000:]
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
        proc.stdout.close()
    # What up printed is the same redis-cli lines, with its port instead of the lookup.
    port = re.search(r"REDIS_URL=redis://127\.0\.0\.1:(\d+)/0", "".join(printed)).group(1)
    shown = [line.strip() for line in printed if line.strip().startswith(("diffserve submit", "redis-cli"))]
    assert shown == [line.replace('-u "$(diffserve stack --redis-url)"', f"-p {port}") for line in lines]
    assert not (tmp_path / "run" / "diffserve" / "stack.json").exists()  # up removed its record on stop
