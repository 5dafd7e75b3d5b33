"""``diffserve healthcheck --port N``: exit 0 when a service's metrics endpoint says it is ready.

Every service sets the gauge ``diffserve_ready{service="<name>"}`` to 1 once it has
reached Redis and loaded what it needs (see ``common.metrics.READY``).  This command
fetches ``http://HOST:PORT/metrics`` and looks for that sample with the value 1; it is
what the compose healthchecks run inside each container.  Standard library only, so
it starts fast and never imports torch.
"""

from __future__ import annotations

import argparse
import re
import sys
import urllib.error
import urllib.request

READY_METRIC = "diffserve_ready"
# name{labels} value [timestamp]  (text exposition format 0.0.4 and OpenMetrics)
_SAMPLE_RE = re.compile(r"^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
_LABEL_RE = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def ready_services(text: str) -> dict[str, float]:
    """``{service label: value}`` of every ``diffserve_ready`` sample in a metrics page."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE_RE.match(line.strip())
        if not match or match["name"] != READY_METRIC:
            continue
        labels = dict(_LABEL_RE.findall(match["labels"] or ""))
        try:
            found[labels.get("service", "")] = float(match["value"])
        except ValueError:
            continue
    return found


def check(host: str, port: int, timeout: float, service: str | None = None) -> tuple[bool, str]:
    """(ready?, message)."""
    url = f"http://{host}:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return False, f"not ready: cannot fetch {url}: {getattr(exc, 'reason', exc)}"
    samples = ready_services(text)
    if service is not None:
        samples = {name: value for name, value in samples.items() if name == service}
    ready = sorted(name for name, value in samples.items() if value == 1.0)
    if ready:
        return True, f"ready: {', '.join(ready)}"
    if samples:
        states = ", ".join(f"{name}={value:g}" for name, value in sorted(samples.items()))
        return False, f"not ready: {READY_METRIC} {states} at {url}"
    wanted = f'{{service="{service}"}}' if service else ""
    return False, f"not ready: no {READY_METRIC}{wanted} sample at {url} (still starting?)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="diffserve healthcheck",
        description="Exit 0 when http://HOST:PORT/metrics has diffserve_ready{service=...} 1, else exit 1.",
    )
    parser.add_argument("--port", type=int, required=True, help="the service's metrics port (METRICS_PORT)")
    parser.add_argument("--host", default="127.0.0.1", help="host of the metrics endpoint [default 127.0.0.1]")
    parser.add_argument("--timeout", type=float, default=3.0, help="HTTP timeout in seconds [default 3]")
    parser.add_argument(
        "--service", default=None, help="require this service label (default: any diffserve_ready sample equal to 1)"
    )
    parser.add_argument("--quiet", action="store_true", help="print nothing when ready")
    args = parser.parse_args(argv)
    ok, message = check(args.host, args.port, args.timeout, args.service)
    if ok:
        if not args.quiet:
            print(message)
        raise SystemExit(0)
    print(message, file=sys.stderr)
    raise SystemExit(1)


if __name__ == "__main__":
    main()
