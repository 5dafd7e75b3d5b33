"""Gateway: the HTTP front door.  The OpenAI images API (the light image streamed first), an
async jobs API, API keys with shared limits, health/readiness, metrics and a web playground.

It talks to the stack only through Redis: jobs go in and results come back with
``common.client`` (one reply stream per gateway process); async jobs get a reply stream of
their own (``<ns>:reply:job-<id>``), so any gateway replica can answer for them.

Starlette on uvicorn, not FastAPI: the OpenAI contract wants its own error bodies (400 with
``param``, never FastAPI's 422) and field rules we check by hand anyway, so FastAPI's pydantic
layer would only be bypassed; Starlette is the routing/SSE core FastAPI itself runs on.

Modules, by API: ``config`` (GatewayConfig), ``http`` (errors, bodies, SSE, the request counter),
``keys`` (API keys and their shared limits, with the token-bucket scripts ``*.lua``), ``request`` (what an
image request may ask, shared by both APIs), ``images`` (the OpenAI images API), ``jobs`` (the jobs
API), ``app`` (routes, health, status, the playground, ``main``).
"""

from services.gateway.app import main

__all__ = ["main"]
