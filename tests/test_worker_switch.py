"""A worker reads the other role's model into host memory at start (--stage-other-role), so its first role
switch, often a burst's, copies the model from there instead of loading it from disk; without the host
cache, or with staging off, the switch loads from disk."""

from __future__ import annotations

import asyncio

import pytest

from common.backends.profiled import LOAD_SECONDS, ProfiledModel
from common.messages import Role
from common.service import Service
from services.worker import Worker, WorkerConfig

TIME_SCALE = 0.2


@pytest.fixture
def loads(monkeypatch):
    """(model, source) of every load of a profiled model, in order."""
    seen: list[tuple[str, str]] = []
    real = ProfiledModel.load

    def spy(self, source="disk"):
        seen.append((self.name, source))
        return real(self, source)

    monkeypatch.setattr(ProfiledModel, "load", spy)
    return seen


async def _switch_to_heavy(redis_url: str, *, at_once: bool, **config) -> tuple[Worker, float]:
    cfg = WorkerConfig(
        redis_url=redis_url, backend="profiled", instance_id="w", role="light", time_scale=TIME_SCALE, **config
    )
    svc = Service("worker", cfg)
    worker = Worker(svc)
    try:
        await worker.start()
        if not at_once and worker.staging is not None:
            await worker.staging
        await worker.switch(Role.HEAVY)
        assert worker.role == Role.HEAVY and worker.loaded.name == "sdv15"
        assert await svc.redis.hget(svc.keys.worker_info("w"), "role") == b"heavy"
        return worker, worker.last_switch_s
    finally:
        await worker.close()
        await svc.redis.aclose()


@pytest.mark.parametrize("at_once", [False, True], ids=["after-staging", "while-staging"])
def test_the_first_switch_copies_the_staged_model_from_host_memory(redis_server, loads, at_once):
    worker, switch_s = asyncio.run(_switch_to_heavy(redis_server.url, at_once=at_once))
    # the light model from disk at start, the heavy one from disk in the background, then from host memory
    assert loads == [("sdturbo", "disk"), ("sdv15", "disk"), ("sdv15", "host")]
    assert set(worker.models) == {Role.LIGHT, Role.HEAVY}
    if not at_once:  # the disk read was done before the switch: it took the copy's time only
        assert switch_s < LOAD_SECONDS["disk"]["sdv15"] * TIME_SCALE


@pytest.mark.parametrize(
    "config", [{"stage_other_role": False}, {"host_cache": False}], ids=["staging-off", "no-cache"]
)
def test_without_staging_the_first_switch_loads_from_disk(redis_server, loads, config):
    worker, switch_s = asyncio.run(_switch_to_heavy(redis_server.url, at_once=False, **config))
    assert worker.staging is None
    assert loads == [("sdturbo", "disk"), ("sdv15", "disk")]
    assert switch_s >= LOAD_SECONDS["disk"]["sdv15"] * TIME_SCALE
