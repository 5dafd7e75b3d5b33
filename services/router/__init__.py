"""Router: admits jobs (validate, stamp arrival and deadline, enqueue for the light model) and delivers
each job's final result exactly once.

Modules, by idea: ``config`` (RouterConfig), ``validate`` (what an entry may hold, and the answer to one
refused), ``sources`` (the submission streams and their reader), ``admission`` (duplicates and retries,
routing, admission by predicted wait), ``delivery`` (exactly-once answers, with ``deliver_once.lua``),
``tenants`` (tenants' streams and connection cap, with ``forget_tenant.lua``), ``app`` (the loops, ``main``).
"""

from services.router.app import main
from services.router.config import RouterConfig
from services.router.tenants import over_connection_cap
from services.router.validate import parse_entry, parse_job

__all__ = ["RouterConfig", "main", "over_connection_cap", "parse_entry", "parse_job"]
