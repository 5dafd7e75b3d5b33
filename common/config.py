"""Configuration: one dataclass per service, filled from CLI flags, then env, then defaults.

A field declared with :func:`option` becomes ``--flag-name`` on the command line and
``DIFFSERVE_FLAG_NAME`` in the environment (or the ``env`` name given).  The help
strings are the documentation of the defaults (``diffserve <service> --help``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Self


def option(default: Any, help: str, *, env: str | None = None, choices: tuple[str, ...] | None = None) -> Any:
    meta = {"help": help, "env": env, "choices": choices}
    if isinstance(default, (list, dict)):
        factory: type[list[Any]] | type[dict[Any, Any]] = type(default)
        return field(default_factory=lambda: factory(default), metadata=meta)
    return field(default=default, metadata=meta)


def _env_name(f: dataclasses.Field[Any]) -> str:
    name: str = f.metadata.get("env") or "DIFFSERVE_" + f.name.upper()
    return name


def _parse_value(raw: str, hint: Any) -> Any:
    optional = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    base = [t for t in typing.get_args(hint) if t is not type(None)] if optional else [hint]
    t = typing.get_origin(base[0]) or base[0]
    if t is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {raw!r}")
    if t is list:
        item = typing.get_args(base[0])[0]
        return [item(x) for x in raw.split(",") if x.strip()]
    if raw == "" and optional:
        return None
    return t(raw)


def _parser_for(hint: Any) -> Callable[[str], Any]:
    return lambda raw: _parse_value(raw, hint)


@dataclass
class RedisSettings:
    """How every service reaches Redis and the image store. Password/ACL user and TLS (``rediss://``) work."""

    redis_url: str = option(
        "redis://127.0.0.1:6379/0", "Redis URL; rediss:// for TLS; may hold user:password@", env="REDIS_URL"
    )
    redis_username: str | None = option(None, "ACL user name (overrides the URL's)", env="REDIS_USERNAME")
    redis_password: str | None = option(None, "password (overrides the URL's)", env="REDIS_PASSWORD")
    redis_tls_ca: str | None = option(None, "CA bundle that signs the Redis server certificate", env="REDIS_TLS_CA")
    redis_tls_cert: str | None = option(None, "client certificate for mutual TLS", env="REDIS_TLS_CERT")
    redis_tls_key: str | None = option(None, "client key for mutual TLS", env="REDIS_TLS_KEY")
    namespace: str = option("diffserve", "prefix of every Redis key and stream", env="DIFFSERVE_NAMESPACE")
    # Where image bytes live (common/blobs.py): stream entries carry references to them.
    blob_url: str = option(
        "",
        "image store: empty = the queue Redis; redis://... (several, comma-separated: shards; user:password@ "
        "in the URL, TLS files as for REDIS_URL); s3://bucket/prefix (endpoint and credentials from AWS_* env)",
        env="DIFFSERVE_BLOB_URL",
    )
    blob_ttl_s: int = option(
        4200,
        "stored images expire after this; at least --result-ttl-s plus the longest SLO (600 s)",
        env="DIFFSERVE_BLOB_TTL_S",
    )
    blob_timeout_s: float = option(
        10.0,
        "longest one image-store read or write may take, retries included; then its jobs get internal_error",
        env="DIFFSERVE_BLOB_TIMEOUT_S",
    )
    blob_min_bytes: int = option(
        4096, "images smaller than this travel inside the stream entries, not stored", env="DIFFSERVE_BLOB_MIN_BYTES"
    )

    def __post_init__(self) -> None:
        self.check_tls()

    def check_tls(self) -> None:
        """TLS files with a redis:// URL would be ignored and the connection left in clear text."""
        given = [
            name
            for name, value in (
                ("REDIS_TLS_CA", self.redis_tls_ca),
                ("REDIS_TLS_CERT", self.redis_tls_cert),
                ("REDIS_TLS_KEY", self.redis_tls_key),
            )
            if value
        ]
        if given and not self.redis_url.startswith("rediss://"):
            raise ValueError(
                f"{', '.join(given)} set but REDIS_URL is not rediss://: use rediss:// for TLS or drop the TLS settings"
            )

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One ``--flag`` per field (every config class: the Redis settings alone, or a service's)."""
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.metadata.get("help"):
                continue
            hint = hints[f.name]
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            flag = "--" + f.name.replace("_", "-")
            helptext = f"{f.metadata['help']} [env {_env_name(f)}; default {default!r}]"
            if hint is bool:
                parser.add_argument(
                    flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=helptext
                )
            else:
                parser.add_argument(
                    flag,
                    dest=f.name,
                    default=None,
                    help=helptext,
                    choices=f.metadata.get("choices"),
                    type=_parser_for(hint),
                )

    @classmethod
    def from_namespace(
        cls, ns: argparse.Namespace | None = None, env: Mapping[str, str] | None = None, *, local_stack: bool = False
    ) -> Self:
        """CLI value if given, else env, else the documented default.  ``local_stack``: a command that
        talks to a stack (submit, tenant, loadtest, the gateway) defaults to the one ``diffserve up``
        recorded (common/stackfile.py) when no Redis URL is given."""
        env = os.environ if env is None else env
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            value = getattr(ns, f.name, None) if ns is not None else None
            if value is None and _env_name(f) in env:
                value = _parse_value(env[_env_name(f)], hints[f.name])
            if value is not None:
                choices = f.metadata.get("choices")
                if choices and value not in choices:
                    raise SystemExit(f"{_env_name(f)}={value!r}: choose one of {', '.join(choices)}")
                kwargs[f.name] = value
        if local_stack and "redis_url" not in kwargs:
            from common import stackfile

            found = stackfile.find()
            if found is not None:
                kwargs["redis_url"] = found["redis_url"]
                kwargs.setdefault("namespace", found.get("namespace", "diffserve"))
        try:
            return cls(**kwargs)
        except ValueError as exc:  # a setting that contradicts another: one line, not a traceback
            raise SystemExit(f"{cls.__name__}: {exc}") from None

    @classmethod
    def from_args(cls, argv: list[str] | None = None, prog: str | None = None, *, local_stack: bool = False) -> Self:
        parser = argparse.ArgumentParser(prog=prog, description=cls.__doc__)
        cls.add_arguments(parser)
        return cls.from_namespace(parser.parse_args(argv), local_stack=local_stack)


@dataclass
class ServiceConfig(RedisSettings):
    """Fields every service has."""

    metrics_port: int = option(0, "Prometheus metrics port (0: none)", env="METRICS_PORT")
    metrics_addr: str = option(
        "127.0.0.1",
        "address the metrics port listens on: loopback unless set (compose sets 0.0.0.0 inside its network)",
        env="METRICS_ADDR",
    )
    clock_skew_ms: float = option(
        0.0,
        "how far clocks of different hosts may differ (NTP keeps it small); a "
        "stage checking a deadline another host set treats it as this much earlier",
        env="DIFFSERVE_CLOCK_SKEW_MS",
    )
    log_level: str = option("INFO", "log level", env="LOG_LEVEL")
    instance_id: str = option("", "unique name of this process (default: host-pid)", env="DIFFSERVE_INSTANCE_ID")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.instance_id:
            self.instance_id = f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class ReplySettings:
    """How long answers are kept: the router delivers them, the heavy workers send progress onto the
    same reply streams, the gateway keeps url images and async jobs as long."""

    result_ttl_s: int = option(
        3600,
        "how long results, done markers and reply streams are kept (the gateway: url images and async jobs)",
        env="DIFFSERVE_RESULT_TTL_S",
    )
    reply_maxlen: int = option(100000, "approximate cap of a client's reply stream", env="DIFFSERVE_REPLY_MAXLEN")


class Keys:
    """Every Redis key and stream name, in one place."""

    def __init__(self, namespace: str = "diffserve"):
        ns = namespace
        self.jobs = f"{ns}:jobs"  # clients -> router
        self.light_queue = f"{ns}:queue:light"  # router -> light workers
        self.light_results = f"{ns}:queue:discriminator"  # light workers -> discriminator
        self.heavy_queue = f"{ns}:queue:heavy"  # discriminator/router -> heavy workers
        self.completions = f"{ns}:completions"  # any stage -> router
        self.dead_letters = f"{ns}:dead-letters"
        self.plan = f"{ns}:plan"
        self.plan_channel = f"{ns}:plan-announce"
        self.workers = f"{ns}:workers"  # zset: worker_id -> last heartbeat (ms)
        self.worker_info_prefix = f"{ns}:worker:"  # hash per worker
        self.stats = f"{ns}:stats"  # hash of counters the controller reads
        self.arrivals_prefix = f"{ns}:arrivals:"  # per minute: hash of 100-ms bucket -> jobs the router read
        self.confidences = f"{ns}:confidences"  # list: the discriminator's latest scores (the controller's replay)
        self.done_prefix = f"{ns}:done:"
        self.admitted_prefix = f"{ns}:admitted:"  # job id -> the jobs-stream entry that was admitted under it
        self.result_prefix = f"{ns}:result:"
        self.reply_prefix = f"{ns}:reply:"  # clients' own reply streams
        self.cancel_prefix = f"{ns}:cancel:"  # set by a client to cancel a job that has not started
        self.gateway_prefix = f"{ns}:gateway:"  # the HTTP gateway's keys (limits, async jobs, image links)
        self.tenants = f"{ns}:tenants"  # set of tenant names: Redis-direct clients with keys of their own
        # tenant name -> its epoch (from the counter below): a name removed and added again is a new tenant
        self.tenant_epochs = f"{ns}:tenant-epochs"
        self.tenant_epoch_counter = f"{ns}:tenant-epoch-counter"
        self.tenant_in_prefix = f"{ns}:in:"  # a tenant's submission stream (only it writes, only the router reads)
        self.tenant_out_prefix = f"{ns}:out:"  # a tenant's reply streams (only the router writes, only it reads)
        self.blob_prefix = f"{ns}:blob:"  # stored images in a Redis image store (common/blobs.py)

    def queue_for(self, role: str) -> str:
        return {"light": self.light_queue, "heavy": self.heavy_queue}[role]

    def arrivals(self, page: int) -> str:
        return f"{self.arrivals_prefix}{page}"

    def worker_info(self, worker_id: str) -> str:
        return self.worker_info_prefix + worker_id

    def done(self, job_id: str) -> str:
        return self.done_prefix + job_id

    def admitted(self, job_id: str) -> str:
        return self.admitted_prefix + job_id

    def result(self, job_id: str) -> str:
        return self.result_prefix + job_id

    def cancel(self, job_id: str) -> str:
        return self.cancel_prefix + job_id

    def tenant_in(self, tenant: str) -> str:
        return self.tenant_in_prefix + tenant

    def tenant_out(self, tenant: str) -> str:
        """The prefix of every reply stream of ``tenant`` (the ':' ends the name, so no tenant's
        prefix is another's)."""
        return f"{self.tenant_out_prefix}{tenant}:"
