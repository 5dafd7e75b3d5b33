"""Redis security settings end to end: TLS (rediss://) with a CA, and an ACL user limited to
the diffserve keys. Real redis-server, real services."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys

import pytest
import redis

from common.client import Client
from common.config import RedisSettings
from common.localstack import LocalStack, RedisServer, StackSpec

ACL_RULES = ["on", ">svc-secret", "~diffserve:*", "&diffserve:*", "+@all", "-@dangerous"]
# The narrowest user a trusted app on the shared stream works with (untrusted clients are tenants:
# tests/test_tenants.py); it shares those keys with every such app.
CLIENT_ACL_RULES = [
    "on",
    ">client-secret",
    "resetkeys",
    "~diffserve:jobs",
    "~diffserve:reply:*",
    "~diffserve:result:*",
    "+xadd",
    "+xread",
    "+xlen",
    "+del",
    "+blpop",
    "+ping",
    "+client|setname",
]


def _make_certs(folder) -> tuple[str, str, str]:
    """A throwaway CA and a server certificate for 127.0.0.1 (openssl CLI)."""
    run = lambda *args: subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)  # noqa: E731
    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "1",
        "-subj",
        "/CN=diffserve-test-ca",
    )
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
    )
    return str(folder / "server.crt"), str(folder / "server.key"), str(folder / "ca.crt")


async def _one_job(settings: RedisSettings):
    async with Client(settings) as client:
        return await client.submit("a harbour at dawn", timeout=60)


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("openssl"), reason="needs the openssl command to make certificates")
def test_tls_with_password_end_to_end(tmp_path):
    cert, key, ca = _make_certs(tmp_path)
    server = RedisServer(password="tls-secret", tls=(cert, key, ca)).start()
    try:
        assert server.url.startswith("rediss://")
        spec = StackSpec(
            redis_url=server.url, light_workers=1, heavy_workers=1, time_scale=0.01, env={"REDIS_TLS_CA": ca}
        )
        with LocalStack(spec, str(tmp_path / "logs")):
            result = asyncio.run(_one_job(RedisSettings(redis_url=server.url, redis_tls_ca=ca)))
        assert result.status == "ok"
        with pytest.raises(redis.exceptions.ConnectionError):  # plain TCP is not served
            redis.Redis(host="127.0.0.1", port=server.port, password="tls-secret", socket_timeout=2).ping()
    finally:
        server.stop()


@pytest.mark.slow
def test_services_run_as_an_acl_user_limited_to_their_keys(tmp_path):
    server = RedisServer(password="admin-secret").start()
    try:
        assert server.cli("ACL", "SETUSER", "diffserve", *ACL_RULES) == "OK"
        assert server.cli("ACL", "SETUSER", "app", *CLIENT_ACL_RULES) == "OK"
        url = f"redis://127.0.0.1:{server.port}/0"
        spec = StackSpec(
            redis_url=url,
            light_workers=1,
            heavy_workers=1,
            time_scale=0.01,
            env={"REDIS_USERNAME": "diffserve", "REDIS_PASSWORD": "svc-secret"},
        )
        with LocalStack(spec, str(tmp_path / "logs")):
            result = asyncio.run(
                _one_job(RedisSettings(redis_url=url, redis_username="app", redis_password="client-secret"))
            )
        assert result.status == "ok"
        app = redis.Redis(host="127.0.0.1", port=server.port, username="app", password="client-secret")
        with pytest.raises(redis.exceptions.NoPermissionError):
            app.get("diffserve:plan")  # a client cannot read or change the plan
        with pytest.raises(redis.exceptions.NoPermissionError):
            app.xadd("diffserve:queue:heavy", {"m": b"x"})  # nor skip the router
        limited = redis.Redis(host="127.0.0.1", port=server.port, username="diffserve", password="svc-secret")
        with pytest.raises(redis.exceptions.NoPermissionError):
            limited.get("someone-else:key")
        with pytest.raises(redis.exceptions.NoPermissionError):
            limited.flushall()
    finally:
        server.stop()


def test_tls_settings_with_a_plain_redis_url_are_refused_at_start(redis_server):
    """REDIS_TLS_CA with redis:// would silently connect in clear text: refused with one line."""
    env = {**os.environ, "REDIS_URL": redis_server.url, "REDIS_TLS_CA": "/etc/ssl/certs/ca-certificates.crt"}
    proc = subprocess.run(
        [sys.executable, "-m", "services.router"], env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode != 0
    assert "rediss://" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    with pytest.raises(ValueError, match="rediss://"):
        Client(RedisSettings(redis_url=redis_server.url, redis_tls_ca="/etc/ssl/certs/ca-certificates.crt"))
