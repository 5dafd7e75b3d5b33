"""Configuration: one dataclass per service, filled from CLI flags, then env, then defaults.

A field declared with :func:`option` becomes ``--flag-name`` on the command line and
``DIFFSERVE_FLAG_NAME`` in the environment (or the ``env`` name given).  The help
strings are the documentation of the defaults (``diffserve <service> --help``).

Each setting is declared once: a setting several services read lives in a shared option group
(``RedisSettings``, ``ReplySettings``, ``WorkerRegistrySettings``, ``ConsumerSettings``, ``RequestLimits``
here; ``BackendSettings`` and ``SloSettings`` in common/backends; ``LatePolicySettings`` in
common/routing) that each service's config class inherits, and a command-line tool that takes one
of them adds that option (``add_arguments(parser, only=...)``) instead of declaring its own
(tests/test_config.py walks every config class for duplicates).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import os
import re
import socket
import types
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Self

from common.cascades import DEFAULT_CASCADE
from common.messages import Role


def option(
    default: Any, help: str, *, env: str | None = None, choices: tuple[str, ...] | None = None, secret: bool = False
) -> Any:
    """``secret``: never logged (the effective configuration shows it as ``***``); a URL's password is
    hidden whatever the field."""
    meta = {"help": help, "env": env, "choices": choices, "secret": secret}
    if isinstance(default, (list, dict)):
        factory: type[list[Any]] | type[dict[Any, Any]] = type(default)
        return field(default_factory=lambda: factory(default), metadata=meta)
    return field(default=default, metadata=meta)


def env_name(f: dataclasses.Field[Any]) -> str:
    name: str = f.metadata.get("env") or "DIFFSERVE_" + f.name.upper()
    return name


def _parse_value(raw: str, hint: Any) -> Any:
    optional = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    base = [t for t in typing.get_args(hint) if t is not type(None)] if optional else [hint]
    t = typing.get_origin(base[0]) or base[0]
    if optional and (raw == "" or (t is bool and raw.strip().lower() == "auto")):  # unset: the code decides
        return None
    if t is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {raw!r}")
    if t is list:
        item = typing.get_args(base[0])[0]
        return [item(x) for x in raw.split(",") if x.strip()]
    return t(raw)


def _default(f: dataclasses.Field[Any]) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _parser_for(hint: Any) -> Callable[[str], Any]:
    return lambda raw: _parse_value(raw, hint)


class Settings:
    """What every option group and config class can do: become flags, be read from CLI/env/defaults, and
    say what is in force."""

    @classmethod
    def add_arguments(
        cls,
        parser: argparse.ArgumentParser | argparse._ArgumentGroup,
        only: Collection[str] | None = None,
        *,
        resolved: bool = False,
    ) -> None:
        """One ``--flag`` per field (every config class: an option group alone, or a service's); ``only``:
        just these fields (a tool that takes a few of a group's settings). The value is left None unless
        given, so ``from_namespace`` fills in the env and the default; ``resolved``: the flag's default is
        the value in force now (env, else the declared default), for a tool that reads ``args`` directly."""
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]  # every subclass is a dataclass
            if not f.metadata.get("help") or (only is not None and f.name not in only):
                continue
            hint = hints[f.name]
            default = cls.resolved(f.name) if resolved else None
            default_value = _default(f)
            if isinstance(default_value, enum.Enum):  # as it is typed: its value
                default_value = default_value.value
            shown = "" if resolved else f"; default {default_value!r}"  # resolved: the formatter shows it
            helptext = f"{f.metadata['help']} [env {env_name(f)}{shown}]"
            flag = "--" + f.name.replace("_", "-")
            if hint is bool:
                parser.add_argument(
                    flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=helptext
                )
            else:
                parser.add_argument(
                    flag,
                    dest=f.name,
                    default=default,
                    help=helptext,
                    choices=f.metadata.get("choices"),
                    type=_parser_for(hint),
                )

    @classmethod
    def env_value(cls, name: str, env: Mapping[str, str] | None = None) -> Any:
        """Option ``name``'s value from the environment, parsed; None when its variable is not set."""
        env = os.environ if env is None else env
        f = next(f for f in dataclasses.fields(cls) if f.name == name)  # type: ignore[arg-type]
        return _parse_value(env[env_name(f)], typing.get_type_hints(cls)[name]) if env_name(f) in env else None

    @classmethod
    def resolved(cls, name: str, env: Mapping[str, str] | None = None) -> Any:
        """Option ``name`` as in force without a flag: its env value, else its declared default."""
        value = cls.env_value(name, env)
        if value is not None:
            return value
        return _default(next(f for f in dataclasses.fields(cls) if f.name == name))  # type: ignore[arg-type]

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
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            value = getattr(ns, f.name, None) if ns is not None else None
            if value is None and env_name(f) in env:
                value = _parse_value(env[env_name(f)], hints[f.name])
            if value is not None:
                choices = f.metadata.get("choices")
                if choices and value not in choices:
                    raise SystemExit(f"{env_name(f)}={value!r}: choose one of {', '.join(choices)}")
                kwargs[f.name] = value
        if local_stack and "redis_url" not in kwargs and "redis_url" in hints:
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

    def effective(self) -> dict[str, Any]:
        """Every setting's value as in force, secrets hidden: what a service logs once at start."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if not f.metadata.get("help"):
                continue
            value = getattr(self, f.name)
            if f.metadata.get("secret") and value:
                value = "***"
            elif isinstance(value, str):
                value = _URL_PASSWORD.sub(r"\1***@", value)
            out[f.name] = value
        return out


# user:password@ in a URL (several URLs may share one value, comma-separated)
_URL_PASSWORD = re.compile(r"(://[^:/@,]*:)[^@/,]*@")


@dataclass(kw_only=True)
class RedisSettings(Settings):
    """How every service reaches Redis and the image store. Password/ACL user and TLS (``rediss://``) work."""

    redis_url: str = option(
        "redis://127.0.0.1:6379/0", "Redis URL; rediss:// for TLS; may hold user:password@", env="REDIS_URL"
    )
    redis_username: str | None = option(None, "ACL user name (overrides the URL's)", env="REDIS_USERNAME")
    redis_password: str | None = option(None, "password (overrides the URL's)", env="REDIS_PASSWORD", secret=True)
    redis_tls_ca: str | None = option(None, "CA bundle that signs the Redis server certificate", env="REDIS_TLS_CA")
    redis_tls_cert: str | None = option(None, "client certificate for mutual TLS", env="REDIS_TLS_CERT")
    redis_tls_key: str | None = option(None, "client key for mutual TLS", env="REDIS_TLS_KEY")
    namespace: str = option("diffserve", "prefix of every Redis key and stream", env="DIFFSERVE_NAMESPACE")
    # Where image bytes live (common/blobs.py): stream entries carry references to them.
    blob_url: str = option(
        "",
        "image store: empty = the queue Redis; redis://... (several, comma-separated: shards; user:password@ "
        "in the URL, TLS files as for REDIS_URL); s3://bucket/prefix (endpoint and credentials from AWS_* env); "
        "file:///dir (a directory every process shares: tmpfs, a shared volume)",
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


@dataclass(kw_only=True)
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


@dataclass(kw_only=True)
class ReplySettings(Settings):
    """How long answers are kept: the router delivers them, the heavy workers send progress onto the
    same reply streams, the gateway keeps url images and async jobs as long."""

    result_ttl_s: int = option(
        3600,
        "how long results, done markers and reply streams are kept (the gateway: url images and async jobs)",
        env="DIFFSERVE_RESULT_TTL_S",
    )
    reply_maxlen: int = option(100000, "approximate cap of a client's reply stream", env="DIFFSERVE_REPLY_MAXLEN")


# A worker heartbeats every second (WorkerConfig.heartbeat_s); one missed by this long is gone.
WORKER_TIMEOUT_S = 5.0


@dataclass(kw_only=True)
class WorkerRegistrySettings(Settings):
    """Which workers are alive: one window for everyone who counts them (the controller's plans, the
    router's and discriminator's view of the stages, the gateway's readiness; common/plan_store.py)."""

    worker_timeout_s: float = option(
        WORKER_TIMEOUT_S,
        "a worker without a heartbeat for this long is not counted (plans, admission, routing, readiness)",
        env="DIFFSERVE_WORKER_TIMEOUT_S",
    )


@dataclass(kw_only=True)
class ConsumerSettings(Settings):
    """How the consumers of one stage share its stream (router, workers, discriminator; common/streams.py)."""

    reclaim_idle_ms: int = option(
        15000,
        "take over entries a dead consumer left idle this long (a live one keeps its own fresh, however long its "
        "batch runs)",
        env="DIFFSERVE_RECLAIM_IDLE_MS",
    )
    max_deliveries: int = option(
        5, "fail a job whose batch crashed this many consumers", env="DIFFSERVE_MAX_DELIVERIES"
    )


@dataclass(kw_only=True)
class RequestLimits(Settings):
    """What a submitted job may hold (the router checks it; the gateway refuses it at the door)."""

    max_prompt_chars: int = option(2000, "longest prompt accepted", env="DIFFSERVE_MAX_PROMPT_CHARS")


@dataclass(kw_only=True)
class GatewayAddress(Settings):
    """Where the HTTP gateway listens (the gateway, and ``diffserve up`` that starts one)."""

    host: str = option("127.0.0.1", "listen address (0.0.0.0 in a container)", env="DIFFSERVE_GATEWAY_HOST")
    port: int = option(8000, "HTTP port", env="DIFFSERVE_GATEWAY_PORT")


@dataclass(kw_only=True)
class TenantSettings(Settings):
    """Whom a command-line client submits as (``diffserve submit``)."""

    tenant: str | None = option(
        None,
        "submit as this tenant (its Redis user: --redis-username, default the tenant's name)",
        env="DIFFSERVE_TENANT",
    )


@dataclass(kw_only=True)
class CascadeSettings(Settings):
    """Which cascade the deployment serves."""

    cascade: str = option(
        DEFAULT_CASCADE,
        "cascade served (see `diffserve cascades`): the gateway's only valid `model`",
        env="DIFFSERVE_CASCADE",
    )


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

    def queue_for(self, role: Role) -> str:
        return {Role.LIGHT: self.light_queue, Role.HEAVY: self.heavy_queue}[role]

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
