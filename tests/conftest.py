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


@pytest.fixture
def profiled_worker():
    """Makes a worker of the profiled backend in this process (services/worker.py) after storing its plan and
    the pipeline's consumer groups, as Service.run does; the test starts and closes it."""
    from common.plan_store import store_plan
    from common.service import Service
    from common.streams import ensure_pipeline_groups
    from services.worker import Worker, WorkerConfig

    async def make(redis_url: str, namespace: str, worker_id: str, role: str, plan, time_scale: float) -> Worker:
        cfg = WorkerConfig(
            redis_url=redis_url,
            namespace=namespace,
            backend="profiled",
            instance_id=worker_id,
            role=role,
            time_scale=time_scale,
            stage_other_role=False,
        )
        svc = Service("worker", cfg)
        await store_plan(svc.redis, svc.keys, plan)
        await ensure_pipeline_groups(svc.redis, svc.keys)
        return Worker(svc)

    return make


@pytest.fixture(autouse=True)
def _stack_tests_are_marked_slow(request, monkeypatch):
    """A test that starts service processes must carry ``@pytest.mark.slow`` (``make test-fast`` skips
    those): starting one from an unmarked test fails it, so the marker cannot silently go missing."""
    if request.node.get_closest_marker("slow") is None:
        from common.localstack import LocalStack

        def refuse(self, name):
            pytest.fail(f"{request.node.nodeid} starts a service process ({name}): mark it @pytest.mark.slow")

        monkeypatch.setattr(LocalStack, "_launch", refuse)
