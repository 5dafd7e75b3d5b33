"""Typed, versioned messages and their one wire encoding (msgpack).

Every stream entry carries a single field ``m`` whose value is a msgpack map with
``v`` (schema version) and ``type`` (message kind) plus the dataclass fields.
Nothing on the wire is ever pickled.  Unknown fields are ignored so that a newer
producer can talk to an older consumer; a missing required field or a wrong type
raises :class:`MessageError`, which the services turn into an error result.

Fields added to a type after its first release are listed in its ``LATER`` and left off the wire
while they hold their default (a set ``REFS`` one, a blob reference, makes the message v2), so a
message that does not use them keeps its exact bytes (``tests/test_messages.py`` pins them) and
older readers never see them.  New message types on a reply stream (``light_ready``, ``admitted``,
``progress``) are skipped by readers that predate them: their ``type`` is not ``final_result``.

Longer than 500 lines on purpose: the one serialization module (every wire type, its version rule and
its one encoding), so a wire change is one file to review."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import types
import typing
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import msgpack

# The newest version this code reads. A message is written at the lowest version that can carry it:
# v1 unless it carries a blob reference (v2), so readers that predate references refuse such a message
# (an answer without its image bytes) instead of mistaking it for one without an image.
SCHEMA_VERSION = 2
REFS_VERSION = 2
ENTRY_FIELD = b"m"


# The finite sets on the wire.  StrEnum members are str, so they pack as their plain string (msgpack
# accepts str subclasses) and compare equal to it; decoding turns the string back into the member.
class ErrorCode(enum.StrEnum):
    """Error codes delivered to callers; stable strings, documented in README ("Wire format")."""

    MALFORMED = "malformed"
    INVALID = "invalid_request"
    PROMPT_TOO_LONG = "prompt_too_long"
    OVERLOADED = "overloaded"
    DEADLINE = "deadline_exceeded"
    MODEL = "model_error"
    UNKNOWN_MODEL = "unknown_model"
    INTERNAL = "internal_error"
    DUPLICATE = "duplicate_job_id"  # a job with this id was admitted within the result TTL (in flight or answered)
    CANCELLED = "cancelled"  # status and code of a job its client cancelled before it ran


# The short names every service imports.
E_MALFORMED = ErrorCode.MALFORMED
E_INVALID = ErrorCode.INVALID
E_PROMPT_TOO_LONG = ErrorCode.PROMPT_TOO_LONG
E_OVERLOADED = ErrorCode.OVERLOADED
E_DEADLINE = ErrorCode.DEADLINE
E_MODEL = ErrorCode.MODEL
E_UNKNOWN_MODEL = ErrorCode.UNKNOWN_MODEL
E_INTERNAL = ErrorCode.INTERNAL
E_DUPLICATE = ErrorCode.DUPLICATE
E_CANCELLED = ErrorCode.CANCELLED


class MessageError(ValueError):
    """A payload that cannot be decoded into the expected message."""

    def __init__(self, code: ErrorCode, message: str, job_id: str | None = None):
        super().__init__(message)
        self.code = code
        self.job_id = job_id


class Status(enum.StrEnum):
    """How a job ended (Completion, FinalResult)."""

    OK = "ok"
    ERROR = "error"
    CANCELLED = "cancelled"


class Role(enum.StrEnum):
    """A worker's model, and which model answered a job."""

    LIGHT = "light"
    HEAVY = "heavy"


class RoutedBy(enum.StrEnum):
    """How a routed job reached its queue."""

    CASCADE = "cascade"  # light first, the discriminator decides
    DIRECT = "direct"  # the policy sent it straight to heavy
    FALLBACK = "fallback"  # back to light: the heavy model could not make the deadline


class LightReason(enum.StrEnum):
    """Why a light image is the answer (FinalResult.light_reason)."""

    CONFIDENT = "confident"  # the discriminator's confidence is at or above the threshold the cascade wants
    DEADLINE = "deadline"  # the heavy model could not have answered by the deadline (the deadline rule)
    PLAN = "plan"  # the plan in force had no heavy capacity for it: below the cascade's preferred threshold


class Objective(enum.StrEnum):
    """What the planner maximises among the plans that serve the demand."""

    QUALITY = "quality"  # the best estimated quality (FID) of the light share
    THRESHOLD = "threshold"  # the largest threshold (the paper)


class Policy(enum.StrEnum):
    """The serving policies (``--policy``, Plan.policy); what each one means is its entry in
    common/planner/policies.POLICY_TABLE."""

    DIFFSERVE = "diffserve"
    DIFFSERVE_THRESHOLD = "diffserve-threshold"
    STATIC = "static"
    CLIPPER_LIGHT = "clipper-light"
    CLIPPER_HEAVY = "clipper-heavy"
    PROTEUS = "proteus"
    AIMD = "aimd"


IMAGE_FORMATS = ("png", "webp", "jpeg")
BLOB_FORMATS = (*IMAGE_FORMATS, "rgb")  # rgb: a raw RGB8 thumbnail


def new_job_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True, kw_only=True)
class BlobRef:
    """Where stored image bytes are (common/blobs.py): a key in the blob store, their size, format and
    sha256 (hex). On the wire a map ``{key, size, format, digest}``."""

    key: str
    size: int
    format: str
    digest: str = ""


@dataclass(kw_only=True)
class Message:
    TYPE: ClassVar[str] = ""
    # Fields added after readers were deployed are left off the wire at their default, so a message
    # that does not use them keeps its exact bytes (tests/test_messages.py). LATER ones are safe for an
    # old reader to ignore; a set REFS one (a blob reference) makes the message v2.
    LATER: ClassVar[frozenset[str]] = frozenset()
    REFS: ClassVar[frozenset[str]] = frozenset()

    def wire_fields(self) -> dict[str, Any]:
        """The fields as they go on the wire (a nested message without its ``v`` and ``type``)."""
        body: dict[str, Any] = {}
        for f in _fields(type(self)):
            value = getattr(self, f.name)
            if (f.name in self.LATER or f.name in self.REFS) and value == _default(f):
                continue
            body[f.name] = _wire(value)
        return body

    def wire_version(self) -> int:
        for name in self.REFS:
            if getattr(self, name) is not None:
                return REFS_VERSION
        for f in _fields(type(self)):
            value = getattr(self, f.name)
            if isinstance(value, Message) and value.wire_version() == REFS_VERSION:
                return REFS_VERSION
        return 1

    def to_dict(self) -> dict[str, Any]:
        body = self.wire_fields()
        body["v"] = self.wire_version()
        body["type"] = self.TYPE
        return body

    def encode(self) -> bytes:
        packed: bytes = msgpack.packb(self.to_dict(), use_bin_type=True)
        return packed

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> Self:
        kind = body.get("type", cls.TYPE)
        if kind != cls.TYPE:
            raise MessageError(E_MALFORMED, f"expected a {cls.TYPE!r} message, got {kind!r}", _job_id_of(body))
        version = body.get("v", SCHEMA_VERSION)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise MessageError(E_MALFORMED, f"unsupported schema version {version!r}", _job_id_of(body))
        kwargs: dict[str, Any] = {}
        hints = _type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in body:
                kwargs[f.name] = _check_type(f.name, body[f.name], hints[f.name], body)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise MessageError(E_INVALID, f"missing field {f.name!r}", _job_id_of(body))
        return cls(**kwargs)

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        return cls.from_dict(unpack(payload))


def _wire(value: Any) -> Any:
    if isinstance(value, Message):
        return value.wire_fields()
    if isinstance(value, BlobRef):
        return {"key": value.key, "size": value.size, "format": value.format, "digest": value.digest}
    if isinstance(value, dict):
        return {k: _wire(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_wire(v) for v in value]
    return value


_FIELDS: dict[type, tuple[dataclasses.Field[Any], ...]] = {}


def _fields(cls: type) -> tuple[dataclasses.Field[Any], ...]:
    if cls not in _FIELDS:
        _FIELDS[cls] = dataclasses.fields(cls)
    return _FIELDS[cls]


def _default(f: dataclasses.Field[Any]) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def unpack(payload: bytes) -> dict[str, Any]:
    """msgpack bytes -> dict, refusing anything that is not a map with string keys."""
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=True, max_bin_len=64 << 20)
    except Exception as exc:  # msgpack raises a zoo of exception types
        raise MessageError(E_MALFORMED, f"payload is not valid msgpack: {type(exc).__name__}") from None
    if not isinstance(body, dict):
        raise MessageError(E_MALFORMED, "payload is not a msgpack map")
    return body


# A submitted id has at most 128 characters; inside the pipeline a tenant's is "NAME/<id>" (common/tenants.py).
MAX_PIPELINE_ID_CHARS = 32 + 1 + 128


def _job_id_of(body: dict[str, Any]) -> str | None:
    job_id = body.get("job_id")
    return job_id if isinstance(job_id, str) and 0 < len(job_id) <= MAX_PIPELINE_ID_CHARS else None


_HINTS: dict[type, dict[str, Any]] = {}


def _type_hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _check_type(name: str, value: Any, hint: Any, body: dict[str, Any]) -> Any:
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for member in allowed:
        t = typing.get_origin(member) or member
        if t is type(None) and value is None:
            return value
        if t is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if t is int and isinstance(value, bool):
            continue
        if isinstance(t, type) and issubclass(t, enum.StrEnum):
            if isinstance(value, str):
                try:
                    return t(value)
                except ValueError:
                    pass
            continue
        if t is BlobRef:
            if isinstance(value, dict):
                return _blob_ref(name, value, body)
            continue
        if t is not type(None) and isinstance(value, t):
            return _enum_values(name, value, typing.get_args(member), body) if t is dict else value
    raise MessageError(E_INVALID, f"field {name!r} has the wrong type ({type(value).__name__})", _job_id_of(body))


def _enum_values(name: str, value: dict[Any, Any], args: tuple[Any, ...], body: dict[str, Any]) -> dict[Any, Any]:
    """A map whose values are a wire enum (``Plan.roles``): each value turned into its member."""
    kind = args[1] if len(args) == 2 else None
    if not (isinstance(kind, type) and issubclass(kind, enum.StrEnum)):
        return value
    try:
        return {k: kind(v) for k, v in value.items()}
    except (ValueError, TypeError):
        raise MessageError(
            E_INVALID, f"field {name!r} holds a value that is no {kind.__name__}", _job_id_of(body)
        ) from None


def _blob_ref(name: str, value: dict[str, Any], body: dict[str, Any]) -> BlobRef:
    key, size, fmt, digest = value.get("key"), value.get("size"), value.get("format"), value.get("digest", "")
    if not (
        isinstance(key, str)
        and 0 < len(key) <= MAX_BLOB_KEY_CHARS
        and isinstance(size, int)
        and not isinstance(size, bool)
        and 0 <= size
        and fmt in BLOB_FORMATS
        and isinstance(digest, str)
        and len(digest) <= 128
    ):
        raise MessageError(E_INVALID, f"field {name!r} is not a valid blob reference", _job_id_of(body))
    return BlobRef(key=key, size=size, format=fmt, digest=digest)


# A blob key is a pipeline job id, '.', and what the blob is (common/blobs.py: blob_key).
MAX_BLOB_KEY_CHARS = MAX_PIPELINE_ID_CHARS + 16


@dataclass(kw_only=True)
class Job(Message):
    """What a client puts on the jobs stream."""

    TYPE: ClassVar[str] = "job"
    LATER: ClassVar[frozenset[str]] = frozenset({"image_ref", "reply_token", "negative_prompt", "progress"})
    job_id: str
    prompt: str
    slo_ms: float | None = None  # per-job SLO; the cascade default when absent
    seed: int | None = None
    image_format: str = "png"
    image_quality: int = 90  # webp/jpeg only
    reply_to: str | None = None  # a stream to XADD the result to; else the result list key
    submitted_ms: float | None = None  # client clock, informational
    cascade: str | None = None  # optional: refused unless it is the cascade this deployment serves
    partials: bool = False  # send a LightReady to reply_to when the light image goes on to the heavy model
    prompt_index: int | None = None  # line of the prompt file (trace replays: recorded confidences by line)
    image_ref: bool = False  # answer with a reference to the stored image (FinalResult.image_ref), not its bytes
    # A secret of the submitter, echoed in the job's answers: a reader of its reply stream accepts only
    # answers that carry it (anyone who can write the stream but not read the jobs stream cannot forge one).
    reply_token: str | None = None
    negative_prompt: str | None = None  # what the image should not show (real models; placeholders ignore it)
    # Send an Admitted (queue position) and the heavy model's Progress (denoising steps) to reply_to.
    progress: bool = False

    def digest(self) -> str:
        """What makes two submissions under one id the same request (an idempotent retry, design.md):
        every field but the id and the informational ``submitted_ms``. The reply target is in it, so a
        matching entry can never move the answer; a tenant's ids are its own, so no one else can match."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        del fields["job_id"], fields["submitted_ms"]
        packed: bytes = msgpack.packb(sorted(fields.items()), use_bin_type=True)
        return hashlib.sha256(packed).hexdigest()[:32]


@dataclass(kw_only=True)
class Cancel(Message):
    """On a submission stream: cancel a job of this submitter that has not started (tenants cancel this
    way; the router sets the cancel flag, with a TTL, only for an id it admitted)."""

    TYPE: ClassVar[str] = "cancel"
    job_id: str


@dataclass(kw_only=True)
class RoutedJob(Message):
    """A validated job, stamped by the router; the payload of the light and heavy queues."""

    TYPE: ClassVar[str] = "routed_job"
    LATER: ClassVar[frozenset[str]] = frozenset({"image_ref", "reply_token", "negative_prompt", "progress"})
    REFS: ClassVar[frozenset[str]] = frozenset({"light_ref"})
    job_id: str
    prompt: str
    arrival_ms: float
    deadline_ms: float
    seed: int
    image_format: str = "png"
    image_quality: int = 90
    reply_to: str | None = None
    confidence: float | None = None  # set when the discriminator sends the job on to the heavy model
    light_image: bytes | None = None  # kept so a late heavy job can still be answered with it
    light_image_format: str | None = None
    routed_by: RoutedBy = RoutedBy.CASCADE
    partials: bool = False  # copied from Job
    prompt_index: int | None = None
    image_ref: bool = False  # copied from Job
    light_ref: BlobRef | None = None  # the stored light image (instead of light_image)
    reply_token: str | None = None  # copied from Job
    negative_prompt: str | None = None  # copied from Job
    progress: bool = False  # copied from Job

    def blob_keys(self) -> list[str]:
        """The stored images of this job so far (what its final answer releases)."""
        return [self.light_ref.key] if self.light_ref else []


@dataclass(kw_only=True)
class LightResult(Message):
    """Light worker -> discriminator."""

    TYPE: ClassVar[str] = "light_result"
    REFS: ClassVar[frozenset[str]] = frozenset({"image_ref", "thumbnail_ref"})
    job: RoutedJob
    image: bytes | None = None  # small images travel inline, others are stored (image_ref)
    image_format: str
    thumbnail: bytes | None = None  # raw RGB8 at the discriminator's input size
    thumbnail_size: int = 0
    worker_id: str = ""
    model: str = ""
    batch_size: int = 0
    light_ms: float = 0.0
    image_ref: BlobRef | None = None
    thumbnail_ref: BlobRef | None = None  # the thumbnail, stored (the discriminator deletes it once scored)

    def routed(self) -> RoutedJob:
        """The job with its light image attached (inline or by reference), as it goes on."""
        job = self.job
        job.light_image, job.light_image_format, job.light_ref = self.image, self.image_format, self.image_ref
        return job

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> Self:
        job = body.get("job")
        if not isinstance(job, dict):
            raise MessageError(E_MALFORMED, "light result without a job map")
        return super().from_dict({**body, "job": RoutedJob.from_dict({**job, "type": RoutedJob.TYPE})})


@dataclass(kw_only=True)
class Completion(Message):
    """A stage's final answer for one job, sent to the router's completion stream."""

    TYPE: ClassVar[str] = "completion"
    LATER: ClassVar[frozenset[str]] = frozenset({"by_ref", "partials", "blobs", "light_reason", "reply_token"})
    REFS: ClassVar[frozenset[str]] = frozenset({"image_ref"})
    job_id: str
    arrival_ms: float
    deadline_ms: float
    reply_to: str | None = None
    status: Status = Status.OK
    image: bytes | None = None
    image_format: str | None = None
    answered_by: Role | None = None
    model: str | None = None
    confidence: float | None = None
    degraded: bool = False  # a light answer for a job the cascade wanted the heavy model for (light_reason says why)
    error_code: ErrorCode | None = None
    error_message: str | None = None
    worker_id: str = ""
    image_ref: BlobRef | None = None  # the answer's stored image (instead of image)
    by_ref: bool = False  # the job asked for a reference (Job.image_ref)
    partials: bool = False  # copied from the job: its light image may have been sent (LightReady)
    blobs: list[str] = field(default_factory=list)  # keys of every stored image of the job
    light_reason: LightReason | None = None
    reply_token: str | None = None  # copied from the job

    @classmethod
    def failure(cls, job: RoutedJob, code: ErrorCode, message: str, worker_id: str = "") -> Self:
        return cls(
            job_id=job.job_id,
            arrival_ms=job.arrival_ms,
            deadline_ms=job.deadline_ms,
            reply_to=job.reply_to,
            reply_token=job.reply_token,
            status=Status.ERROR,
            error_code=code,
            error_message=message,
            worker_id=worker_id,
            by_ref=job.image_ref,
            partials=job.partials,
            blobs=job.blob_keys(),
        )

    @classmethod
    def cancelled(
        cls, job: RoutedJob, worker_id: str = "", message: str = "cancelled by the client before it ran"
    ) -> Self:
        return cls(
            job_id=job.job_id,
            arrival_ms=job.arrival_ms,
            deadline_ms=job.deadline_ms,
            reply_to=job.reply_to,
            reply_token=job.reply_token,
            status=Status.CANCELLED,
            error_code=E_CANCELLED,
            error_message=message,
            worker_id=worker_id,
            by_ref=job.image_ref,
            partials=job.partials,
            blobs=job.blob_keys(),
        )

    @classmethod
    def answer(
        cls,
        job: RoutedJob,
        image: bytes | BlobRef,
        *,
        image_format: str,
        answered_by: Role,
        model: str,
        confidence: float | None = None,
        worker_id: str = "",
        light_reason: LightReason | None = None,
    ) -> Self:
        """An image answer (``image``: the bytes, or the reference to them when stored); a light one says
        why it is light, and is degraded unless it was confident."""
        ref = image if isinstance(image, BlobRef) else None
        blobs = job.blob_keys()
        if ref is not None and ref.key not in blobs:
            blobs.append(ref.key)
        return cls(
            job_id=job.job_id,
            arrival_ms=job.arrival_ms,
            deadline_ms=job.deadline_ms,
            reply_to=job.reply_to,
            reply_token=job.reply_token,
            image=image if isinstance(image, bytes) else None,
            image_format=image_format,
            answered_by=answered_by,
            model=model,
            confidence=confidence,
            degraded=light_reason not in (None, LightReason.CONFIDENT),
            worker_id=worker_id,
            image_ref=ref,
            by_ref=job.image_ref,
            partials=job.partials,
            blobs=blobs,
            light_reason=light_reason,
        )

    def kept_blobs(self) -> set[str]:
        """The stored images the client may still read once this is delivered: none when the answer
        carries the bytes; else the answer's, and with partials every one (the light image was sent)."""
        if not self.by_ref or self.status != Status.OK:
            return set()
        return set(self.blobs) if self.partials else {self.image_ref.key} if self.image_ref else set()


@dataclass(kw_only=True)
class FinalResult(Message):
    """What the client receives, exactly once per accepted job."""

    TYPE: ClassVar[str] = "final_result"
    LATER: ClassVar[frozenset[str]] = frozenset({"retry_after_ms", "light_reason", "reply_token"})
    REFS: ClassVar[frozenset[str]] = frozenset({"image_ref"})
    job_id: str
    status: Status
    image: bytes | None = None
    image_format: str | None = None
    answered_by: Role | None = None
    model: str | None = None
    confidence: float | None = None
    degraded: bool = False
    latency_ms: float | None = None
    slo_met: bool | None = None
    error_code: ErrorCode | None = None
    error_message: str | None = None
    finished_ms: float = 0.0
    retry_after_ms: float | None = None  # with error_code overloaded: when a retry is predicted to be admitted
    image_ref: BlobRef | None = None  # a job that asked image_ref: the stored image (read it with common.blobs)
    light_reason: LightReason | None = None  # answered_by light: confident, deadline or plan
    reply_token: str | None = None  # the job's, so its submitter can tell this answer from a forged one


@dataclass(kw_only=True)
class LightReady(Message):
    """Discriminator -> a job's reply stream, only for jobs that asked (``partials``): the light
    image exists and the job went on to the heavy model.  Not a result; the FinalResult follows.
    Consumers that predate it skip it (its ``type`` is not ``final_result``)."""

    TYPE: ClassVar[str] = "light_ready"
    LATER: ClassVar[frozenset[str]] = frozenset({"reply_token"})
    REFS: ClassVar[frozenset[str]] = frozenset({"image_ref"})
    job_id: str
    image: bytes | None = None
    image_format: str
    model: str = ""
    confidence: float | None = None
    ready_ms: float = 0.0
    image_ref: BlobRef | None = None  # a job that asked image_ref: the stored light image
    reply_token: str | None = None  # the job's, as in FinalResult


@dataclass(kw_only=True)
class Admitted(Message):
    """Router -> a job's reply stream, only for jobs that asked (``progress``), in the transaction
    that queues the job: it was admitted, with ``ahead`` jobs in the queue it joined and a
    predicted wait there.  Not a result; the FinalResult follows."""

    TYPE: ClassVar[str] = "admitted"
    LATER: ClassVar[frozenset[str]] = frozenset({"reply_token"})
    job_id: str
    queue: Role = Role.LIGHT
    ahead: int = 0
    wait_ms: float = 0.0
    reply_token: str | None = None  # the job's, as in FinalResult


@dataclass(kw_only=True)
class Progress(Message):
    """Heavy worker -> a job's reply stream, only for jobs that asked (``progress``): denoising
    step ``step`` of ``steps`` is done (sent at most a few times a second).  Not a result."""

    TYPE: ClassVar[str] = "progress"
    LATER: ClassVar[frozenset[str]] = frozenset({"reply_token"})
    job_id: str
    step: int
    steps: int
    model: str = ""
    reply_token: str | None = None  # the job's, as in FinalResult


# What a job's reply stream carries before its FinalResult, by ``type``.
EVENT_TYPES: dict[str, type[Message]] = {t.TYPE: t for t in (LightReady, Admitted, Progress)}


@dataclass(kw_only=True)
class DeadLetter(Message):
    """An entry that could not be answered because no job id could be read from it."""

    TYPE: ClassVar[str] = "dead_letter"
    stream: str
    entry_id: str
    error_code: ErrorCode
    error_message: str
    raw: bytes = b""


@dataclass(kw_only=True)
class Plan(Message):
    """The controller's current plan; stored under one key, read by every service."""

    TYPE: ClassVar[str] = "plan"
    version: int = 0
    # Informational on the wire (any name: the data plane reads the plan's explicit fields, never this),
    # so a plan from a controller with other policy or objective names still decodes.
    policy: str = Policy.DIFFSERVE
    threshold: float = 0.5
    light_batch: int = 4
    heavy_batch: int = 1
    light_workers: int = 0
    heavy_workers: int = 0
    heavy_fraction: float = 0.0  # share of jobs the router sends straight to heavy (split policies)
    roles: dict[str, Role] = field(default_factory=dict)  # worker_id -> its role
    demand_qps: float = 0.0
    feasible: bool = True
    objective: str = Objective.QUALITY
    estimated_quality: float | None = None
    created_ms: float = 0.0
    # What the data plane does with it (common/planner.py POLICY_TABLE says per policy):
    discriminator_routes: bool = True  # False: every light image is the answer
    degrade_late: bool = True  # the deadline rule (common/routing.py) answers late heavy jobs with the light image
    # The threshold the cascade's quality wants with heavy room for every job (planner.quality_threshold): a light
    # answer below it was kept light by the plan (LightReason.PLAN).
    target_threshold: float | None = None
    reason: str | None = None  # why the controller chose this plan (its trade-offs, in words)
    # ms (the deployment's clock) a heavy worker that read fewer jobs than heavy_batch waits for more before it
    # runs them (common/routing.heavy_fill_ms: only while the threshold is below target_threshold)
    heavy_fill_ms: float = 0.0
    # ms (the deployment's clock) over which the discriminator holds the light share the threshold gives its
    # recent confidences (common/routing.ShareKeeper; 0: the threshold as it is, as a fixed plan keeps it)
    share_window_ms: float = 0.0
    LATER: ClassVar[frozenset[str]] = frozenset({"target_threshold", "reason", "heavy_fill_ms", "share_window_ms"})
