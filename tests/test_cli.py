"""The diffserve command: every listed command resolves, and help works from the installed script."""

from __future__ import annotations

import importlib
import shutil
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
