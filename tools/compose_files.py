"""Reading and merging compose files as ``docker compose -f base -f override`` does (the parts the
project's files use), for the compose tests and for Compose v1, which has no ``!reset``."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml


class Reset:
    """Compose's ``!reset`` tag (v2.24+): drop the value of the files before."""


class ComposeLoader(yaml.SafeLoader):  # type: ignore[misc]  # PyYAML ships no annotations
    pass


class Override:
    """Compose's ``!override`` tag (v2.24.4+): this value replaces the files' before, unmerged."""

    def __init__(self, value: Any):
        self.value = value


def _override(loader: ComposeLoader, node: Any) -> Override:
    return Override(
        loader.construct_sequence(node, deep=True)
        if isinstance(node, yaml.SequenceNode)
        else loader.construct_mapping(node, deep=True)
    )


ComposeLoader.add_constructor("!reset", lambda loader, node: Reset())
ComposeLoader.add_constructor("!override", _override)


def load(path: Path) -> dict[str, Any]:
    with open(path) as f:
        tree: dict[str, Any] = yaml.load(f, Loader=ComposeLoader)
        return tree


# Compose replaces these sequences instead of appending (compose-spec "merge" rules).
_REPLACED = {("command",), ("entrypoint",), ("healthcheck", "test")}


def merge(base: Any, override: Any, path: tuple[str, ...] = ()) -> Any:
    """Merge two compose trees as ``docker compose -f base -f override`` does (the parts we use)."""
    if isinstance(override, Reset):
        return None
    if isinstance(override, Override):
        return copy.deepcopy(override.value)
    if isinstance(base, dict) and isinstance(override, dict):
        out = copy.deepcopy(base)
        for key, value in override.items():
            if isinstance(value, Reset):
                out.pop(key, None)
            elif key in out:
                out[key] = merge(out[key], value, path + (key,))
            else:
                out[key] = copy.deepcopy(value.value if isinstance(value, Override) else value)
        return out
    if (
        isinstance(base, list)
        and isinstance(override, list)
        and path[-2:] not in _REPLACED
        and path[-1:] not in _REPLACED
    ):
        return base + [v for v in override if v not in base]
    return copy.deepcopy(override)


def absolute_paths(tree: dict[str, Any], compose_dir: Path) -> dict[str, Any]:
    """A merged tree written elsewhere must keep pointing at compose/'s files."""
    tree = copy.deepcopy(tree)
    for svc in tree["services"].values():
        if "build" in svc:
            svc["build"]["context"] = str((compose_dir / svc["build"]["context"]).resolve())
        vols = []
        for vol in svc.get("volumes", []):
            source, _, rest = vol.partition(":")
            vols.append(f"{(compose_dir / source).resolve()}:{rest}" if source.startswith(".") else vol)
        if "volumes" in svc:
            svc["volumes"] = vols
        if "env_file" in svc:
            svc["env_file"] = [str(compose_dir / f) for f in svc["env_file"]]
    return tree
