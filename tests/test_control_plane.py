"""The control plane (router, controller, client, load tester, CLI) and the profiled backend run on the
core install: nothing they import pulls in torch or the model libraries, and the real-model backends
say in one line what to install when the `models` extra is missing."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.backends import MODEL_PACKAGES

ROOT = Path(__file__).resolve().parent.parent

IMPORTS = """
import json, sys
import common.client, common.health, diffserve.cli, diffserve.local, loadtest.cli, loadtest.runner
import services.controller, services.discriminator, services.gateway, services.router, services.worker
import common.planner, common.control, loadtest.simulate
from common.backends import BackendSettings, load_profile, make_discriminator, make_model
settings = BackendSettings(backend="profiled")
make_model(settings, "light"); make_model(settings, "heavy"); make_discriminator(settings); load_profile(settings)
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def test_control_plane_and_profiled_backend_import_no_model_library():
    out = subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    loaded = set(json.loads(out.stdout.splitlines()[-1]))
    assert "services" in loaded
    assert not loaded & set(MODEL_PACKAGES), f"the control plane imports {sorted(loaded & set(MODEL_PACKAGES))}"


@pytest.mark.parametrize("command", ["worker", "discriminator"])
@pytest.mark.parametrize("backend", ["tiny", "diffusers"])
def test_real_backends_without_the_extra_fail_in_one_line(monkeypatch, capsys, command, backend):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in MODEL_PACKAGES else real_find_spec(name, *a)
    )
    module = importlib.import_module(f"services.{command}")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--backend", backend, "--redis-url", "redis://127.0.0.1:1/0"])  # stops before Redis
    message = str(exit_info.value.code)
    assert "\n" not in message and f"--backend {backend} needs torch" in message
    assert "pip install" in message and "'diffserve[models]'" in message
