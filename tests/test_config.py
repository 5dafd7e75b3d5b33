"""Service configuration: CLI over env over documented defaults, typed parsing."""

from __future__ import annotations

import argparse
import json

import pytest

from common.config import RedisSettings
from services.worker import WorkerConfig


def _config(argv: list[str], env: dict[str, str]) -> WorkerConfig:
    parser = argparse.ArgumentParser()
    WorkerConfig.add_arguments(parser)
    return WorkerConfig.from_namespace(parser.parse_args(argv), env=env)


def test_cli_beats_env_beats_default():
    assert _config([], {}).role == "light"
    assert _config([], {"DIFFSERVE_ROLE": "heavy"}).role == "heavy"
    assert _config(["--role", "light"], {"DIFFSERVE_ROLE": "heavy"}).role == "light"


def test_typed_values_from_env():
    cfg = _config(
        [],
        {
            "DIFFSERVE_BATCH_GRID": "1,4,16",
            "DIFFSERVE_HOST_CACHE": "off",
            "DIFFSERVE_TIME_SCALE": "0.1",
            "DIFFSERVE_LATENCY_FILE": "",
            "REDIS_URL": "rediss://u:p@h:6380/0",
        },
    )
    assert cfg.batch_grid == [1, 4, 16] and cfg.host_cache is False and cfg.time_scale == 0.1
    assert cfg.latency_file is None and cfg.redis_url.startswith("rediss://")
    assert _config(["--no-host-cache", "--batch-grid", "2,8"], {}).batch_grid == [2, 8]


def test_bad_values_are_refused():
    with pytest.raises(SystemExit):
        _config([], {"DIFFSERVE_ROLE": "medium"})
    with pytest.raises(ValueError):
        _config([], {"DIFFSERVE_HOST_CACHE": "maybe"})
    with pytest.raises(SystemExit):
        _config(["--role", "medium"], {})


def test_commands_find_the_stack_diffserve_up_recorded(tmp_path, monkeypatch):
    """submit, tenant, loadtest and the gateway default to the stack `up` recorded; a URL given wins,
    and a record whose `up` is gone is ignored."""
    from common import stackfile

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("DIFFSERVE_NAMESPACE", raising=False)
    assert RedisSettings.from_namespace(local_stack=True).redis_url == "redis://127.0.0.1:6379/0"
    written = stackfile.record({"redis_url": "redis://127.0.0.1:4321/0", "namespace": "mine"})
    assert written == tmp_path / "diffserve" / "stack.json" and (written.stat().st_mode & 0o777) == 0o600
    found = RedisSettings.from_namespace(local_stack=True)
    assert (found.redis_url, found.namespace) == ("redis://127.0.0.1:4321/0", "mine")
    assert RedisSettings.from_namespace().redis_url == "redis://127.0.0.1:6379/0"  # services do not look
    monkeypatch.setenv("REDIS_URL", "redis://10.0.0.1:6379/0")
    assert RedisSettings.from_namespace(local_stack=True).redis_url == "redis://10.0.0.1:6379/0"
    monkeypatch.delenv("REDIS_URL")
    data = json.loads(written.read_text())
    written.write_text(json.dumps({**data, "pid": 2**22 + 12345}))  # no such process
    assert RedisSettings.from_namespace(local_stack=True).redis_url == "redis://127.0.0.1:6379/0"
    written.write_text(json.dumps(data))
    stackfile.forget()
    assert not written.exists()
