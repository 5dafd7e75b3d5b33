"""The diffserve command: every listed command resolves, and help works from the installed script."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest

from diffserve.cli import COMMANDS


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_resolves_to_a_function(name):
    module, func = COMMANDS[name][0].split(":")
    assert callable(getattr(importlib.import_module(module), func))


@pytest.mark.parametrize("name", ["router", "worker", "plan", "loadtest", "profile", "cascades"])
def test_help_runs_through_the_console_script(name):
    exe = shutil.which("diffserve") or str(__import__("pathlib").Path(sys.executable).parent / "diffserve")
    args = [exe, name] if name == "cascades" else [exe, name, "--help"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip()


def test_unknown_command_exits_2():
    out = subprocess.run([sys.executable, "-m", "diffserve", "frobnicate"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown command" in out.stderr


def _diffserve(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "diffserve", *args], capture_output=True, text=True, timeout=120, **kwargs
    )


def test_version():
    out = _diffserve("--version")
    assert out.returncode == 0 and re.fullmatch(r"diffserve \S+\n", out.stdout)


@pytest.mark.parametrize(
    "name,defaults",
    [("up", ["default: 4", "default: 1.0", "default: 8000"]), ("demo", ["default: 8", "default: 0.1", "default: 0)"])],
)
def test_up_and_demo_help_show_their_own_defaults(name, defaults):
    out = _diffserve(name, "--help", env={k: v for k, v in os.environ.items() if k != "DIFFSERVE_GATEWAY_PORT"})
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    assert all(d in text for d in defaults), text


def test_up_with_the_gateway_port_taken_says_so_in_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = _diffserve("up", "--gateway-port", str(port), "--redis-url", "redis://127.0.0.1:1/0")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert (
        out.stderr.strip() == f"diffserve up: port {port} is taken: choose another with --gateway-port (0: no gateway)"
    )


def test_plan_says_what_its_quality_number_is():
    out = _diffserve("plan", "--demand", "20", "--workers", "16")
    assert out.returncode == 0 and re.search(r"FID \d+\.\d+ \(lower is better\)", out.stdout), out.stdout
