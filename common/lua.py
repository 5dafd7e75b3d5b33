"""Lua scripts live in ``.lua`` files beside the code that runs them (package data, so an installed wheel
has them) and are read once, when their module is imported.

Whole-line ``--`` comments (each file's header says what the script does and what its KEYS and ARGV are)
are left out of the text sent to Redis: a script run with plain EVAL inside MULTI travels with every call.
"""

from __future__ import annotations

from importlib import resources


def script(package: str, name: str) -> str:
    """The script ``name`` (a path relative to ``package``), without its whole-line comments."""
    text = resources.files(package).joinpath(name).read_text(encoding="utf-8")
    return "".join(line + "\n" for line in text.splitlines() if not line.lstrip().startswith("--"))
