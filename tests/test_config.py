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


# ----------------------------------------------------------------------------- one declaration per setting
PACKAGES = ("common", "services", "loadtest", "diffserve", "tools")


def _config_classes() -> list[type]:
    """Every option group and config class in the code (each module imported, every Settings subclass)."""
    import importlib
    import pkgutil

    from common.config import Settings

    for package in PACKAGES:
        for info in pkgutil.walk_packages(importlib.import_module(package).__path__, f"{package}."):
            if not info.name.endswith("__main__"):
                importlib.import_module(info.name)

    def subclasses(cls: type) -> list[type]:
        return [cls] + [s for sub in cls.__subclasses__() for s in subclasses(sub)]

    return sorted(set(subclasses(Settings)) - {Settings}, key=lambda c: f"{c.__module__}.{c.__qualname__}")


def _declarations(classes: list[type]) -> dict[str, list[tuple[str, object]]]:
    """env name -> (class, default) of every option field a class declares itself (not inherits)."""
    import dataclasses

    from common.config import env_name

    found: dict[str, list[tuple[str, object]]] = {}
    for cls in classes:
        own = cls.__dict__.get("__annotations__", {})
        for f in dataclasses.fields(cls):
            if f.name in own and f.metadata.get("help"):
                default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                found.setdefault(env_name(f), []).append((f"{cls.__module__}.{cls.__qualname__}", default))
    return found


def _duplicates(classes: list[type]) -> dict[str, list[tuple[str, object]]]:
    return {env: where for env, where in _declarations(classes).items() if len(where) > 1}


def test_every_setting_is_declared_once():
    """A setting several services read is one option in a shared group, not a field per service: an env
    name declared by two classes (whatever their defaults) fails here, with where and which defaults."""
    classes = _config_classes()
    assert len(classes) >= 10, [c.__name__ for c in classes]  # the walk found the services' classes
    assert _duplicates(classes) == {}


def test_the_duplicate_check_catches_a_second_declaration():
    """The check itself: a scratch class that declares an existing env name again, with another default."""
    import dataclasses

    from common.config import ConsumerSettings, Settings, option

    @dataclasses.dataclass
    class Scratch(Settings):
        idle: int = option(10000, "a second reclaim time", env="DIFFSERVE_RECLAIM_IDLE_MS")

    found = _duplicates([ConsumerSettings, Scratch])
    assert list(found) == ["DIFFSERVE_RECLAIM_IDLE_MS"]
    assert sorted(default for _where, default in found["DIFFSERVE_RECLAIM_IDLE_MS"]) == [10000, 15000]


def test_settings_are_read_only_through_the_config_classes():
    """No module reads a DIFFSERVE_*/REDIS_* variable itself (a second, undocumented declaration)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    pattern = re.compile(r"""(environ(\.get)?|getenv)\s*[\[(]\s*["'](DIFFSERVE_|REDIS_)""")
    readers = [
        str(path.relative_to(root))
        for package in PACKAGES
        for path in (root / package).rglob("*.py")
        if pattern.search(path.read_text())
    ]
    assert readers == []


def test_the_effective_configuration_hides_secrets():
    from services.gateway.config import GatewayConfig

    cfg = GatewayConfig.from_namespace(
        env={
            "REDIS_URL": "redis://svc:hunter2@10.0.0.1:6379/0",
            "REDIS_PASSWORD": "hunter3",
            "DIFFSERVE_BLOB_URL": "redis://a:pw1@10.0.0.2:6379/0,redis://b:pw2@10.0.0.3:6379/0",
            "DIFFSERVE_API_KEYS": "alice:" + "0" * 64,
        }
    )
    shown = cfg.effective()
    text = json.dumps(shown, default=str)
    assert not any(secret in text for secret in ("hunter2", "hunter3", "pw1", "pw2", "0" * 64)), text
    assert shown["redis_url"] == "redis://svc:***@10.0.0.1:6379/0" and shown["redis_password"] == "***"
    assert shown["port"] == 8000 and shown["worker_timeout_s"] == 5.0  # everything else as in force
