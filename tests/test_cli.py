"""The diffserve command: every listed command resolves, and help works from the installed script."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

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


def _readme_commands() -> list[tuple[str, list[str]]]:
    """Every command of README's command table: (its module for ``python -m``, else "diffserve"; argv)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    found: list[tuple[str, list[str]]] = []
    for row in table.splitlines():
        if not row.startswith("| `"):
            continue
        first_cell = row[2:].split(" | ", 1)[0]
        for span in re.findall(r"`([^`]+)`", first_cell):
            words = span.replace("\\|", "|").split()
            if words[:2] == ["python", "-m"]:
                found.append((words[2], ["--help"]))
                continue
            name = words[1] if words[0] == "diffserve" else words[0]  # `calibrate` in a list of diffserve tools
            if name.startswith("-"):  # --version
                found.append(("diffserve", [name]))
            else:
                found += [("diffserve", [alternative, "--help"]) for alternative in name.split("|")]
    return found


README_COMMANDS = _readme_commands()


def test_the_readme_table_lists_every_command():
    listed = {argv[0] for program, argv in README_COMMANDS if program == "diffserve" and argv[0] in COMMANDS}
    assert len(README_COMMANDS) >= 20 and len(listed) >= 17, README_COMMANDS


@pytest.mark.parametrize("program,argv", README_COMMANDS, ids=[" ".join([p, *a]) for p, a in README_COMMANDS])
def test_every_readme_command_runs_its_help(program, argv, capsys):
    """What README's command table shows runs: its --help (in this process: the same code path as the
    console script, without a process start per command)."""
    from diffserve.cli import main

    run = main if program == "diffserve" else importlib.import_module(program).main
    try:
        run(argv)
    except SystemExit as done:
        assert done.code in (0, None), (program, argv, done.code)
    out = capsys.readouterr().out
    assert out.strip(), (program, argv)
    if argv[-1] == "--help":
        assert "usage:" in out


def test_the_files_code_reads_at_run_time_ship_in_the_wheel():
    """Every Lua script and page the code loads from its package is matched by pyproject's package-data,
    so an installed wheel has it (a wheel built from this tree listed them all)."""
    import tomllib

    root = Path(__file__).resolve().parent.parent
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = {path for package, globs in data.items() for pattern in globs for path in (root / package).glob(pattern)}
    loaded = [path for package in data for suffix in ("*.lua", "*.html") for path in (root / package).rglob(suffix)]
    assert loaded and not [str(path.relative_to(root)) for path in loaded if path not in shipped]
