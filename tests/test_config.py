"""Service configuration: CLI over env over documented defaults, typed parsing."""

from __future__ import annotations

import argparse

import pytest

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
