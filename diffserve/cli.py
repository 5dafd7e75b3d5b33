"""``diffserve <command> [args]``. Each command lives in its own module and is imported
only when run, so ``diffserve submit`` does not load torch and the services stay
independent processes."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    # services (also `python -m services.<name>`)
    "router": ("services.router:main", "admit jobs and deliver results"),
    "worker": ("services.worker:main", "run the light or heavy model"),
    "discriminator": ("services.discriminator:main", "score light images and route them"),
    "controller": ("services.controller:main", "re-plan threshold, batch sizes and roles"),
    "gateway": ("services.gateway:main", "HTTP front door: OpenAI images API, jobs API, playground"),
    # operators
    "up": ("diffserve.local:up_main", "start a local stack (own redis-server unless REDIS_URL)"),
    "demo": ("diffserve.local:demo_main", "local profiled stack + a burst of DiffusionDB prompts + summary"),
    "submit": ("diffserve.local:submit_main", "submit one prompt and save the image"),
    "stack": ("diffserve.local:stack_main", "where the stack `diffserve up` started is (--redis-url: its URL)"),
    "plan": ("common.planner.cli:plan_main", "print the plan the solver would choose (no Redis)"),
    "cascades": ("diffserve.local:cascades_main", "list the known cascades and their models"),
    "tenant": ("common.tenants:main", "add, remove or list tenants (Redis-direct clients with keys of their own)"),
    "healthcheck": ("common.health:main", "exit 0 when a service's metrics endpoint says ready"),
    "loadtest": ("loadtest.cli:main", "replay a trace against a stack and report"),
    "simulate": ("loadtest.simulate:main", "replay a trace on the simulated cascade in virtual time"),
    "make-tiny-models": ("diffserve.local:make_tiny_main", "build tiny random-weight models for tests"),
    "train-discriminator": ("tools.train_discriminator:main", "train the EfficientNet-V2 discriminator"),
    "calibrate": ("tools.calibrate:main", "measure f(t) of a cascade"),
    "profile": ("tools.profile:main", "measure batch latency per model on this device"),
}


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("diffserve")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: diffserve <command> [options]   (diffserve <command> --help, diffserve --version)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {text}" for name, (_target, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    if argv[0] in ("-V", "--version"):
        print(f"diffserve {version()}")
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"diffserve: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    module, func = COMMANDS[name][0].split(":")
    getattr(importlib.import_module(module), func)(rest)
