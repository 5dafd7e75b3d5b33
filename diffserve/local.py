"""Operator commands that need no service code: ``up``, ``demo``, ``submit``, ``stack``, ``cascades``,
``make-tiny-models``. The stack itself runs as separate processes (common.localstack)."""

from __future__ import annotations

import argparse
import asyncio
import errno
import signal
import socket
import statistics
import sys
import time
from collections import Counter
from typing import Any

from common import stackfile
from common.backends import BackendSettings, require_backend, require_models_extra
from common.config import GatewayAddress, RedisSettings, TenantSettings
from common.localstack import LocalStack, StackSpec
from common.messages import IMAGE_FORMATS, FinalResult, Plan, Role


def _stack_arguments(parser: argparse.ArgumentParser) -> None:
    # The services' own options, with the env and defaults they have (the stack runs with what they say).
    BackendSettings.add_arguments(parser, only=("backend", "cascade", "time_scale", "model_dir"), resolved=True)
    parser.add_argument("--workers", type=int, default=4, help="GPU workers (the controller splits them)")
    parser.add_argument("--light-workers", type=int, default=None, help="initial light workers (none: half)")
    parser.add_argument("--policy", default="diffserve", help="controller policy")
    parser.add_argument("--no-controller", action="store_true", help="fixed roles, threshold 0.5")
    parser.add_argument(
        "--redis-url",
        default=RedisSettings.env_value("redis_url"),
        help="use this Redis instead of starting a redis-server [env REDIS_URL]",
    )
    parser.add_argument("--log-dir", default=None, help="service logs (none: a temp folder)")
    parser.add_argument(
        "--metrics-base-port",
        type=int,
        default=0,
        help="metrics ports from here up (0: free loopback ports, printed at start)",
    )
    parser.add_argument(
        "--gateway-port",
        type=int,
        default=GatewayAddress.resolved("port"),
        help="HTTP gateway and playground on 127.0.0.1:PORT, no API keys (0: no gateway) [env DIFFSERVE_GATEWAY_PORT]",
    )


def _parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """`up` and `demo` differ in their defaults: --help shows each one's."""
    return argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )


def _port_taken(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def _spec(args: argparse.Namespace) -> StackSpec:
    require_backend(args.backend)  # before any process starts
    light = args.light_workers if args.light_workers is not None else max(1, args.workers // 2)
    return StackSpec(
        backend=args.backend,
        cascade=args.cascade,
        light_workers=light,
        heavy_workers=max(0, args.workers - light),
        controller=not args.no_controller,
        policy=args.policy,
        time_scale=args.time_scale,
        redis_url=args.redis_url,
        model_dir=args.model_dir,
        metrics_base_port=args.metrics_base_port,
        gateway_port=args.gateway_port,
    )


def up_main(argv: list[str] | None = None) -> None:
    parser = _parser("diffserve up", "start a local DiffServe stack")
    _stack_arguments(parser)
    args = parser.parse_args(argv)
    if args.gateway_port and _port_taken(args.gateway_port):  # before anything starts
        raise SystemExit(
            f"diffserve up: port {args.gateway_port} is taken: choose another with --gateway-port (0: no gateway)"
        )
    stack = LocalStack(_spec(args), args.log_dir)
    stack.start()
    gateway = f"http://127.0.0.1:{stack.spec.gateway_port}/" if stack.spec.gateway_port else None
    recorded = stackfile.record(
        {
            "redis_url": stack.redis_url,
            "namespace": stack.spec.namespace,
            "gateway": gateway,
            "workers": stack.spec.light_workers + stack.spec.heavy_workers,
            "backend": stack.spec.backend,
            "log_dir": str(stack.log_dir),
        }
    )
    port = (stack.redis_url or "").rsplit(":", 1)[-1].split("/")[0]
    print(f"DiffServe is up: REDIS_URL={stack.redis_url}  logs: {stack.log_dir}", flush=True)
    print(f"recorded in {recorded}: submit, tenant, loadtest --redis-url and gateway find it", flush=True)
    print("try:", flush=True)
    print('  diffserve submit "a watercolor fox" -o fox.png', flush=True)
    print(f"  redis-cli -p {port} XADD diffserve:jobs '*' job_id j1 prompt \"a lighthouse at dusk\"", flush=True)
    print(f"  redis-cli -p {port} --raw BLPOP diffserve:result:j1 60", flush=True)
    ports = "  ".join(f"{name}={port}" for name, port in stack.metrics_ports.items())
    print(f"metrics (and readiness) on 127.0.0.1: {ports}", flush=True)
    if gateway:
        print(f"playground and OpenAI images API: {gateway}", flush=True)
    stopping = False

    def on_signal(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        while not stopping:
            dead = [name for name, alive in stack.alive().items() if not alive]
            if dead:
                print(f"exited: {dead}; see {stack.log_dir}", file=sys.stderr)
                break
            time.sleep(0.5)
    finally:
        stackfile.forget()
        stack.stop()


def demo_main(argv: list[str] | None = None) -> None:
    """The embedded default: a profiled stack, a burst of real DiffusionDB prompts, a summary."""
    parser = _parser("diffserve demo", demo_main.__doc__)
    _stack_arguments(parser)
    parser.add_argument("--prompts", type=int, default=200, help="how many DiffusionDB prompts to send")
    parser.add_argument("--rate", type=float, default=40.0, help="prompts per second in the burst")
    parser.set_defaults(time_scale=0.1, workers=8, gateway_port=0)
    args = parser.parse_args(argv)
    from common.profiles import load_prompts

    prompts = load_prompts()[: args.prompts]
    spec = _spec(args)
    print(
        f"starting a local stack: backend={spec.backend} (profiled = simulated GPU timing, placeholder images), "
        f"cascade={spec.cascade}, workers={args.workers}, time_scale={spec.time_scale}",
        flush=True,
    )
    with LocalStack(spec, args.log_dir) as stack:
        started = time.perf_counter()
        assert stack.redis_url is not None  # set by start()
        results, plan = asyncio.run(_burst(stack.redis_url, prompts, args.rate))
        wall = time.perf_counter() - started
    print(_summary(results, wall, spec))
    if plan is not None:
        print(
            f"  last plan (v{plan.version}, {plan.policy}): threshold {plan.threshold:.2f}, "
            f"light {plan.light_workers} workers x batch {plan.light_batch}, "
            f"heavy {plan.heavy_workers} x {plan.heavy_batch}"
        )


async def _burst(redis_url: str, prompts: list[str], rate: float) -> tuple[list[FinalResult], Plan | None]:
    from common.client import Client
    from common.plan_store import load_plan

    async with Client(redis_url=redis_url) as client:

        async def one(i: int, prompt: str) -> FinalResult:
            await asyncio.sleep(i / rate)
            return await client.submit(prompt, timeout=300)

        results = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        return list(results), await load_plan(client.redis, client.keys)


def _summary(results: list[FinalResult], wall_s: float, spec: StackSpec) -> str:
    ok = [r for r in results if r.status == "ok"]
    by = Counter(r.answered_by for r in ok)
    lat = sorted((r.latency_ms or 0.0) / max(spec.time_scale, 1e-9) for r in ok)  # back to full-speed ms
    slo_hits = sum(bool(r.slo_met) for r in ok)
    lines = [
        f"served {len(results)} prompts in {wall_s:.1f} s wall ({spec.backend} backend, time scale {spec.time_scale})",
        f"  ok {len(ok)}, errors {len(results) - len(ok)}, unique job ids {len({r.job_id for r in results})}",
        f"  answered by light {by.get(Role.LIGHT, 0)} (of which degraded {sum(r.degraded for r in ok)}), "
        f"heavy {by.get(Role.HEAVY, 0)}",
        f"  SLO met {slo_hits}/{len(results)} ({100 * slo_hits / max(1, len(results)):.1f} %)",
    ]
    if lat:
        lines.append(
            f"  latency at full speed (ms): p50 {statistics.median(lat):.0f}, "
            f"p95 {lat[int(0.95 * (len(lat) - 1))]:.0f}, max {lat[-1]:.0f}"
        )
    return "\n".join(lines)


def submit_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="diffserve submit",
        description="submit one prompt, wait for the image (to the stack `diffserve up` recorded unless "
        "--redis-url/REDIS_URL says where)",
    )
    parser.add_argument("prompt")
    parser.add_argument("-o", "--output", default=None, help="write the image here")
    parser.add_argument("--slo-ms", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--negative-prompt", default=None, help="what the image should not show")
    parser.add_argument("--format", default="png", choices=IMAGE_FORMATS)
    parser.add_argument("--timeout", type=float, default=120.0)
    TenantSettings.add_arguments(parser, resolved=True)
    from common.client import Client, preflight

    RedisSettings.add_arguments(parser)
    args = parser.parse_args(argv)
    settings = RedisSettings.from_namespace(args, local_stack=True)

    async def go() -> Any:
        async with Client(settings, tenant=args.tenant) as client:
            problem = await preflight(client, settings.redis_url)
            if problem:
                raise SystemExit(f"diffserve submit: {problem}")
            return await client.submit(
                args.prompt,
                slo_ms=args.slo_ms,
                seed=args.seed,
                negative_prompt=args.negative_prompt,
                image_format=args.format,
                timeout=args.timeout,
            )

    try:
        result = asyncio.run(go())
    except TimeoutError:
        raise SystemExit(f"diffserve submit: no answer within {args.timeout:g} s (--timeout)") from None
    if result.status != "ok":
        print(f"error {result.error_code}: {result.error_message}", file=sys.stderr)
        raise SystemExit(1)
    if args.output:
        with open(args.output, "wb") as fh:
            fh.write(result.image)
    print(
        f"{result.job_id}: answered by {result.answered_by} ({result.model}), confidence "
        f"{result.confidence if result.confidence is None else round(result.confidence, 3)}, "
        f"{result.latency_ms:.0f} ms, SLO {'met' if result.slo_met else 'missed'}"
        + (f", saved {args.output}" if args.output else "")
    )


def stack_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="diffserve stack", description="where the stack `diffserve up` started is (its runtime file)"
    )
    parser.add_argument("--redis-url", action="store_true", help="print only its Redis URL (for redis-cli -u)")
    args = parser.parse_args(argv)
    found = stackfile.find()
    if found is None:
        raise SystemExit(f"diffserve stack: no running `diffserve up` recorded in {stackfile.path()}")
    if args.redis_url:
        print(found["redis_url"])
        return
    for key in ("redis_url", "namespace", "gateway", "workers", "backend", "log_dir", "pid"):
        print(f"{key}: {found.get(key)}")


def cascades_main(argv: list[str] | None = None) -> None:
    from common.cascades import CASCADES, MODELS

    for c in CASCADES.values():
        light, heavy = MODELS[c.light], MODELS[c.heavy]
        print(f"{c.name}: SLO {c.slo_ms:.0f} ms")
        for role, m in (("light", light), ("heavy", heavy)):
            print(f"  {role}: {m.name} {m.hub_id} steps={m.steps} guidance={m.guidance} {m.resolution}px {m.dtype}")


def make_tiny_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="diffserve make-tiny-models", description="tiny random-weight pipelines and discriminator (for tests)"
    )
    parser.add_argument("dir")
    args = parser.parse_args(argv)
    require_models_extra("make-tiny-models")
    from common.backends.tiny import make_tiny_models

    print(make_tiny_models(args.dir))
