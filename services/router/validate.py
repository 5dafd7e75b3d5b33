"""What the router accepts: one submission-stream entry decoded and checked (a job, or a request to
cancel one), and the answer to an entry it does not admit."""

from __future__ import annotations

import re
from typing import Any

from common.config import Keys
from common.messages import (
    E_INVALID,
    E_MALFORMED,
    E_PROMPT_TOO_LONG,
    E_UNKNOWN_MODEL,
    IMAGE_FORMATS,
    Cancel,
    ErrorCode,
    FinalResult,
    Job,
    MessageError,
    Status,
    unpack,
)
from common.streams import Entry
from common.tenants import default_reply
from services.router.config import RouterConfig

JOB_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
PLAIN_FIELDS = {
    "job_id": str,
    "prompt": str,
    "slo_ms": float,
    "seed": int,
    "image_format": str,
    "image_quality": int,
    "reply_to": str,
    "cascade": str,
    "type": str,  # "cancel": a request to cancel the job with this id
    "negative_prompt": str,
}


def parse_job(entry: Entry, cfg: RouterConfig, keys: Keys, tenant: str | None = None) -> Job:
    """Decode and validate one job entry of the shared jobs stream (``tenant`` None) or of a tenant's
    stream; MessageError (with the job id when one could be read) for anything unacceptable."""
    message = parse_entry(entry, cfg, keys, tenant)
    if not isinstance(message, Job):
        raise MessageError(E_MALFORMED, f"expected a job, got a {message.TYPE}", message.job_id)
    return message


def parse_entry(entry: Entry, cfg: RouterConfig, keys: Keys, tenant: str | None = None) -> Job | Cancel:
    """Decode and validate one entry of a submission stream: a job, or a request to cancel one
    (``type: cancel``); MessageError (with the job id when one could be read) for anything unacceptable.
    A tenant's job without ``reply_to`` is answered on its default reply stream."""
    body = _body(entry, cfg.max_entry_bytes)
    if body.get("type") == Cancel.TYPE:
        cancel = Cancel.from_dict(body)
        if not JOB_ID_RE.match(cancel.job_id):
            raise MessageError(E_INVALID, "job_id must be 1-128 characters of letters, digits, _ . : -")
        return cancel
    job = Job.from_dict({**body, "type": Job.TYPE})
    validate_job(job, cfg, keys, tenant)
    if tenant is not None and job.reply_to is None:
        job.reply_to = default_reply(keys, tenant, job.job_id)
    return job


def _body(entry: Entry, max_entry_bytes: int) -> dict[str, Any]:
    """The entry's fields, size-checked: the msgpack map, or plain XADD fields (e.g. from redis-cli)."""
    too_big = f"job entry larger than {max_entry_bytes} bytes"
    if entry.oversized:  # left in Redis by the read: only its job id (and reply stream) came back
        job_id = entry.fields.get(b"job_id", b"").decode("utf-8", "replace")
        raise MessageError(E_INVALID, too_big, job_id or None)
    if entry.payload is not None:
        if len(entry.payload) > max_entry_bytes:
            raise MessageError(E_INVALID, too_big)
        return unpack(entry.payload)
    if not entry.fields:
        raise MessageError(E_MALFORMED, "empty entry")
    if sum(len(k) + len(v) for k, v in entry.fields.items()) > max_entry_bytes:
        raise MessageError(E_INVALID, too_big, entry.fields.get(b"job_id", b"").decode("utf-8", "replace"))
    body: dict[str, Any] = {}
    for raw_key, raw_value in entry.fields.items():
        key = raw_key.decode("utf-8", "replace")
        if key in PLAIN_FIELDS:
            try:
                body[key] = PLAIN_FIELDS[key](raw_value.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                why = f"field {key!r} is not a valid {PLAIN_FIELDS[key].__name__}"
                raise MessageError(E_INVALID, why, body.get("job_id")) from None
    return body


def reply_prefix(keys: Keys, tenant: str | None) -> str:
    """The only names a job from this stream may ask to be answered on."""
    return keys.reply_prefix if tenant is None else keys.tenant_out(tenant)


def validate_job(job: Job, cfg: RouterConfig, keys: Keys, tenant: str | None = None) -> None:
    """MessageError (with the job id when it is a valid one) for the first field that is not acceptable."""
    problem = _prompt_problem(job, cfg.max_prompt_chars) or _field_problem(job, cfg, reply_prefix(keys, tenant))
    if problem is not None:
        code, message = problem
        raise MessageError(code, message, job.job_id if JOB_ID_RE.match(job.job_id) else None)


def _prompt_problem(job: Job, max_chars: int) -> tuple[ErrorCode, str] | None:
    if not JOB_ID_RE.match(job.job_id):
        return E_INVALID, "job_id must be 1-128 characters of letters, digits, _ . : -"
    if not job.prompt.strip():
        return E_INVALID, "prompt is empty"
    if len(job.prompt) > max_chars:
        return E_PROMPT_TOO_LONG, f"prompt longer than {max_chars} characters"
    if "\x00" in job.prompt:
        return E_INVALID, "prompt contains a NUL character"
    if job.negative_prompt is not None and (len(job.negative_prompt) > max_chars or "\x00" in job.negative_prompt):
        return E_INVALID, f"negative_prompt must be at most {max_chars} characters, without NUL"
    return None


def _field_problem(job: Job, cfg: RouterConfig, prefix: str) -> tuple[ErrorCode, str] | None:
    if job.slo_ms is not None and not (0 < job.slo_ms <= 600_000):
        return E_INVALID, "slo_ms must be in (0, 600000]"
    if job.seed is not None and not (0 <= job.seed < 2**63):
        return E_INVALID, "seed must be in [0, 2**63)"
    if job.image_format not in IMAGE_FORMATS:
        return E_INVALID, f"image_format must be one of {', '.join(IMAGE_FORMATS)}"
    if not (1 <= job.image_quality <= 100):
        return E_INVALID, "image_quality must be in [1, 100]"
    if job.reply_to is not None and not (job.reply_to.startswith(prefix) and len(job.reply_to) <= 200):
        return E_INVALID, f"reply_to must be a stream named {prefix}<id>"
    if job.cascade is not None and job.cascade != cfg.cascade:
        return E_UNKNOWN_MODEL, f"this deployment serves cascade {cfg.cascade!r}, not {job.cascade!r}"
    return None


def refusal(
    job_id: str,
    code: ErrorCode,
    message: str,
    finished_ms: float,
    status: Status = Status.ERROR,
    *,
    retry_after_ms: float | None = None,
    reply_token: str | None = None,
) -> FinalResult:
    """The answer to a job the router does not admit (invalid, cancelled, overloaded, duplicate)."""
    return FinalResult(
        job_id=job_id,
        status=status,
        error_code=code,
        error_message=message,
        finished_ms=finished_ms,
        retry_after_ms=retry_after_ms,
        reply_token=reply_token,
    )


def reply_of(entry: Entry, keys: Keys, tenant: str | None, job_id: str) -> tuple[str | None, str | None]:
    """Where to answer an entry that failed validation, and its reply token: its reply stream when that
    is well-formed, else the result list (shared stream) or the tenant's default reply stream."""
    fallback = None if tenant is None else default_reply(keys, tenant, job_id)
    prefix = reply_prefix(keys, tenant)
    try:
        body = (
            unpack(entry.payload)
            if entry.payload is not None
            else {k.decode(): v.decode() for k, v in entry.fields.items()}
        )
    except (MessageError, UnicodeDecodeError):
        return fallback, None
    reply_to, token = body.get("reply_to"), body.get("reply_token")
    valid = isinstance(reply_to, str) and reply_to.startswith(prefix) and len(reply_to) <= 200
    return reply_to if valid else fallback, token if isinstance(token, str) and len(token) <= 64 else None
