"""What an image request may ask (the OpenAI images.generate fields, and ours) and what an answer says
beside its image: shared by the images API and the jobs API."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common import metrics
from common.cascades import MODELS, cascade
from common.messages import (
    E_CANCELLED,
    E_DEADLINE,
    E_INVALID,
    E_OVERLOADED,
    E_PROMPT_TOO_LONG,
    E_UNKNOWN_MODEL,
    IMAGE_FORMATS,
    FinalResult,
)
from services.gateway.config import GatewayConfig
from services.gateway.http import ApiError, invalid

MAX_SEED = 2**63  # what the router accepts
# OpenAI's enumerations of the fields we take but have one answer for; anything else is a 400.
ENUMS: dict[str, tuple[str, ...]] = {
    "quality": ("auto", "standard", "hd", "low", "medium", "high"),
    "background": ("auto", "opaque"),  # "transparent" is a valid OpenAI value we cannot make
    "style": ("vivid", "natural"),
    "moderation": ("auto", "low"),
}


def native_size(cascade_name: str) -> int:
    """The cascade's image size (its heavy model's; the light one renders the same)."""
    return MODELS[cascade(cascade_name).heavy].resolution


# ---------------------------------------------------------------- request parsing


@dataclass(kw_only=True)
class ImageRequest:
    prompt: str
    n: int
    output_format: str
    quality: int
    response_format: str
    stream: bool
    partials: bool
    seed: int | None = None
    negative_prompt: str | None = None
    slo_ms: float | None = None

    def seeds(self) -> list[int]:
        """n seeds: ``seed``, ``seed + 1``, ... when one was given (reproducible), else n distinct random ones."""
        if self.seed is not None:
            return [(self.seed + i) % MAX_SEED for i in range(self.n)]
        return secrets.SystemRandom().sample(range(2**31), self.n)


class _Fields:
    """A request body's fields, each read with its type checked (a 400 naming the field when wrong)."""

    def __init__(self, body: dict[str, Any], cfg: GatewayConfig):
        self.body, self.cfg = body, cfg

    def get(self, name: str, kind: type | tuple[type, ...], default: Any) -> Any:
        value = self.body.get(name)
        if value is None:
            return default
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):  # JSON true is no int
            raise invalid(f"'{name}' must be of type {'/'.join(k.__name__ for k in kinds)}", name)
        return value

    def checked(
        self, name: str, kind: type | tuple[type, ...], default: Any, ok: Callable[[Any], bool], message: str
    ) -> Any:
        """The field (or ``default``), refused with ``message`` unless absent or ``ok``."""
        value = self.get(name, kind, default)
        if value is not None and not ok(value):
            raise invalid(message, name)
        return value

    def text(self, name: str, value: str) -> None:
        limit = self.cfg.max_prompt_chars
        if len(value) > limit:
            metrics.ERRORS.labels("gateway", E_PROMPT_TOO_LONG).inc()
            raise ApiError(400, f"'{name}' is longer than {limit} characters", param=name, code=E_PROMPT_TOO_LONG)
        if "\x00" in value:
            raise invalid(f"'{name}' contains a NUL character", name)

    def prompt(self) -> str:
        prompt = self.body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise invalid("'prompt' is required: a non-empty string", "prompt")
        self.text("prompt", prompt)
        return prompt

    def check_model(self) -> None:
        served = self.cfg.cascade
        for name in ("model", "cascade"):  # `cascade` is our name for the same thing
            model = self.get(name, str, served)
            if model != served:
                metrics.ERRORS.labels("gateway", E_UNKNOWN_MODEL).inc()
                raise ApiError(
                    400, f"model {model!r} is not served here; models: {served}", param=name, code=E_UNKNOWN_MODEL
                )

    def check_shape(self) -> None:
        """Size and steps are the cascade's: asking for exactly those is fine, anything else is refused."""
        side = native_size(self.cfg.cascade)
        requested = self.get("size", str, "auto")
        if requested not in ("auto", f"{side}x{side}"):
            raise invalid(f"size {requested!r} is not supported; sizes: auto, {side}x{side}", "size")
        for name in ("width", "height"):
            if self.get(name, int, side) != side:
                raise invalid(f"'{name}' must be {side}: this cascade renders {side}x{side} images", name)
        spec = cascade(self.cfg.cascade)
        heavy_steps = MODELS[spec.heavy].steps
        if self.get("steps", int, heavy_steps) != heavy_steps:
            light_steps = MODELS[spec.light].steps
            raise invalid(f"'steps' is set by the cascade: light {light_steps}, heavy {heavy_steps}", "steps")
        for name, allowed in ENUMS.items():
            if self.get(name, str, allowed[0]) not in allowed:
                raise invalid(f"'{name}' must be one of {', '.join(allowed)}", name)


def parse_image_request(body: object, cfg: GatewayConfig, *, jobs_api: bool = False) -> ImageRequest:
    """The OpenAI images.generate fields, and ours (``seed``, ``negative_prompt``, ``slo_ms``,
    ``cascade``); unknown fields are ignored, a wrong type or value is a 400 naming the field."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    f = _Fields(body, cfg)
    prompt = f.prompt()
    f.check_model()
    most = 1 if jobs_api else 10
    n = f.checked(
        "n", int, 1, lambda n: 1 <= n <= most, "'n' must be 1 for a job" if jobs_api else "'n' must be between 1 and 10"
    )
    f.check_shape()
    formats = ", ".join(IMAGE_FORMATS)
    output_format = f.checked(
        "output_format", str, "png", lambda v: v in IMAGE_FORMATS, f"'output_format' must be one of {formats}"
    )
    quality = f.checked(
        "output_compression", int, 90, lambda q: 0 <= q <= 100, "'output_compression' must be between 0 and 100"
    )
    response_format = f.checked(
        "response_format",
        str,
        "b64_json",
        lambda v: v in ("b64_json", "url"),
        "'response_format' must be b64_json or url",
    )
    stream = f.get("stream", bool, False)
    partial_images = f.checked(
        "partial_images", int, 0, lambda p: 0 <= p <= 3, "'partial_images' must be between 0 and 3"
    )
    f.get("user", str, None)
    seed = f.checked("seed", int, None, lambda s: 0 <= s < MAX_SEED, "'seed' must be in [0, 2**63)")
    negative_prompt = f.get("negative_prompt", str, None)
    if negative_prompt is not None:
        f.text("negative_prompt", negative_prompt)
    slo_ms = f.checked("slo_ms", (int, float), None, lambda v: 0 < v <= 600_000, "'slo_ms' must be in (0, 600000]")
    return ImageRequest(
        prompt=prompt,
        n=n,
        output_format=output_format,
        quality=max(1, quality),
        response_format=response_format,
        stream=stream,
        partials=partial_images > 0,
        seed=seed,
        negative_prompt=negative_prompt or None,
        slo_ms=None if slo_ms is None else float(slo_ms),
    )


def result_error(result: FinalResult) -> ApiError:
    """A final result that carries no image, as the HTTP error it means."""
    code = result.error_code or "internal_error"
    statuses: dict[str, int] = {
        E_OVERLOADED: 429,
        E_DEADLINE: 504,
        E_INVALID: 400,
        E_PROMPT_TOO_LONG: 400,
        E_UNKNOWN_MODEL: 400,
        E_CANCELLED: 409,
    }
    status = statuses.get(code, 500)
    retry_after = None
    if status == 429:  # the router's hint (the predicted time until a retry fits), else a second
        retry_after = result.retry_after_ms / 1000 if result.retry_after_ms else 1
    return ApiError(status, result.error_message or code, code=code, retry_after=retry_after)


def extra(result: FinalResult, seed: int | None = None, index: int = 0) -> dict[str, Any]:
    """Our own fields beside each OpenAI image object."""
    return {
        "job_id": result.job_id,
        "index": index,
        "seed": seed,
        "answered_by": result.answered_by,
        "model": result.model,
        "confidence": result.confidence,
        "degraded": result.degraded,
        "latency_ms": result.latency_ms,
        "slo_met": result.slo_met,
    }
