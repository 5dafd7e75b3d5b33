"""Where ``diffserve up`` records its stack (a per-user runtime file), so that ``submit``, ``tenant``,
``loadtest --redis-url`` and the gateway reach it without flags: ``$XDG_RUNTIME_DIR/diffserve/stack.json``,
else ``/tmp/diffserve-<uid>/stack.json`` (a folder only its user may enter).  A record whose ``up``
process is gone is ignored."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def path() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / "diffserve" / "stack.json"
    return Path(tempfile.gettempdir()) / f"diffserve-{os.getuid()}" / "stack.json"


def record(info: dict[str, Any]) -> Path:
    """Write ``info`` (with this process's pid) for the commands that look for the local stack."""
    target = path()
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if target.parent.stat().st_uid != os.getuid():  # someone else's folder: not a place for a Redis URL
        raise PermissionError(f"{target.parent} belongs to another user")
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump({**info, "pid": os.getpid()}, fh)
    tmp.replace(target)
    return target


def forget() -> None:
    """Remove the record if this process wrote it (a later ``up`` may have replaced it)."""
    found = _read()
    if found is not None and found.get("pid") == os.getpid():
        path().unlink(missing_ok=True)


def find() -> dict[str, Any] | None:
    """The recorded stack while the process that recorded it runs, else None."""
    found = _read()
    if found is None or not isinstance(found.get("pid"), int):
        return None
    try:
        os.kill(found["pid"], 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, another user's pid namespace view: still ours by the file's owner
        pass
    return found


def _read() -> dict[str, Any] | None:
    try:
        data = json.loads(path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
