"""Shared fixtures: a real redis-server per test (never a mock) and tiny models built once."""

from __future__ import annotations

import os

import pytest

from common.localstack import RedisServer

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def redis_server():
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    from common.backends.tiny import make_tiny_models

    return str(make_tiny_models(tmp_path_factory.mktemp("tiny-models")))
