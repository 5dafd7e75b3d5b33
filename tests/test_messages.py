"""Message schemas and the router's decoder/validation, including a hypothesis fuzz."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.config import Keys
from common.messages import (
    SCHEMA_VERSION,
    Completion,
    FinalResult,
    Job,
    LightReady,
    LightResult,
    MessageError,
    Plan,
    RoutedJob,
    unpack,
)
from common.streams import Entry
from services.router import RouterConfig, parse_job

CFG = RouterConfig(instance_id="test")
KEYS = Keys()


def _entry(payload: bytes | None = None, fields: dict | None = None) -> Entry:
    return Entry("1-0", payload, fields or ({b"m": payload} if payload is not None else {}))


def test_round_trip_of_every_message_type():
    job = RoutedJob("j1", "a cat", 1.0, 5001.0, 7, reply_to="diffserve:reply:x")
    messages = [
        Job("j1", "a cat", slo_ms=300.0, seed=3),
        job,
        LightResult(job, b"\x89PNG", "png", thumbnail=b"\x00" * 12, thumbnail_size=2, model="sdturbo"),
        Completion.answer(job, b"img", "png", "heavy", "sdv15", 0.2),
        FinalResult("j1", "ok", b"img", "png", "light", "sdturbo", 0.9, latency_ms=12.5, slo_met=True),
        Plan(version=3, roles={"w1": "light"}, threshold=0.35),
        Job("j2", "a dog", reply_to="diffserve:reply:x", partials=True),
        LightReady("j1", b"\x89PNG", "png", "sdturbo", 0.2, 5.0),
        Completion.cancelled(job, "w1"),
    ]
    for message in messages:
        decoded = type(message).decode(message.encode())
        assert decoded == message
        assert unpack(message.encode())["v"] == SCHEMA_VERSION


def test_unknown_fields_are_ignored_and_newer_versions_refused():
    body = Job("j1", "a cat").to_dict()
    assert Job.from_dict({**body, "future_field": [1, 2]}) == Job("j1", "a cat")
    with pytest.raises(MessageError):
        Job.from_dict({**body, "v": SCHEMA_VERSION + 1})
    with pytest.raises(MessageError):
        Job.from_dict({**body, "type": "plan"})


def test_partials_and_light_ready_are_backward_compatible():
    """An older producer's job (no partials) still decodes; a reader that only knows FinalResult
    refuses a LightReady by its type (the client skips such entries), never mistakes it for a result."""
    old = Job("j1", "a cat").to_dict()
    del old["partials"]
    assert Job.from_dict(old).partials is False
    with pytest.raises(MessageError):
        FinalResult.decode(LightReady("j1", b"img", "png").encode())
    cancelled = Completion.cancelled(RoutedJob("j1", "a cat", 1.0, 2.0, 7), "w1")
    assert (cancelled.status, cancelled.error_code, cancelled.image) == ("cancelled", "cancelled", None)


def test_wrong_types_are_refused_with_the_job_id():
    with pytest.raises(MessageError) as err:
        Job.from_dict({"job_id": "j9", "prompt": 5})
    assert err.value.job_id == "j9" and err.value.code == "invalid_request"
    with pytest.raises(MessageError):
        Job.from_dict({"job_id": "j9", "prompt": "x", "seed": True})  # bool is not an int here


def test_router_accepts_plain_fields_and_msgpack():
    job = parse_job(_entry(fields={b"job_id": b"a1", b"prompt": b"a fox", b"slo_ms": b"800"}), CFG, KEYS)
    assert (job.job_id, job.prompt, job.slo_ms) == ("a1", "a fox", 800.0)
    job = parse_job(_entry(Job("a2", "a fox", image_format="webp").encode()), CFG, KEYS)
    assert job.image_format == "webp"


@pytest.mark.parametrize(
    "body, code",
    [
        ({"job_id": "x", "prompt": ""}, "invalid_request"),
        ({"job_id": "x", "prompt": "y" * 2001}, "prompt_too_long"),
        ({"job_id": "x", "prompt": "a\x00b"}, "invalid_request"),
        ({"job_id": "x", "prompt": "p", "slo_ms": -1}, "invalid_request"),
        ({"job_id": "x", "prompt": "p", "slo_ms": 1e12}, "invalid_request"),
        ({"job_id": "x", "prompt": "p", "seed": 2**63}, "invalid_request"),
        ({"job_id": "x", "prompt": "p", "image_quality": 0}, "invalid_request"),
        ({"job_id": "x", "prompt": "p", "reply_to": "diffserve:jobs"}, "invalid_request"),
        ({"job_id": "x", "prompt": "p", "cascade": "other"}, "unknown_model"),
        ({"job_id": "bad id with spaces", "prompt": "p"}, "invalid_request"),
    ],
)
def test_router_validation(body, code):
    with pytest.raises(MessageError) as err:
        parse_job(_entry(msgpack.packb(body)), CFG, KEYS)
    assert err.value.code == code
    expected_id = body["job_id"] if " " not in body["job_id"] else None
    assert err.value.job_id == expected_id


def test_oversized_entry_is_refused_before_decoding():
    with pytest.raises(MessageError) as err:
        parse_job(_entry(b"\x00" * (CFG.max_entry_bytes + 1)), CFG, KEYS)
    assert err.value.code == "invalid_request"


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=50),
    st.binary(max_size=50),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
_job_like = st.fixed_dictionaries(
    {},
    optional={
        "job_id": st.one_of(st.text(max_size=140), _scalars),
        "prompt": st.one_of(st.text(max_size=3000), _values),
        "slo_ms": _values,
        "seed": _values,
        "image_format": _values,
        "image_quality": _values,
        "reply_to": _values,
        "cascade": _values,
        "type": _values,
        "v": _values,
    },
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    payload=st.one_of(
        st.binary(max_size=300),
        _job_like.map(lambda d: msgpack.packb(d, use_bin_type=True)),
        _values.map(lambda v: msgpack.packb(v, use_bin_type=True)),
    )
)
def test_fuzzed_payloads_are_either_valid_jobs_or_clean_errors(payload):
    try:
        job = parse_job(_entry(payload), CFG, KEYS)
    except MessageError as exc:
        assert exc.code in ("malformed", "invalid_request", "prompt_too_long", "unknown_model")
        assert exc.job_id is None or isinstance(exc.job_id, str)
        return
    assert isinstance(job.prompt, str) and job.prompt.strip() and len(job.prompt) <= CFG.max_prompt_chars


@settings(max_examples=200, deadline=None)
@given(
    fields=st.dictionaries(
        st.sampled_from([b"job_id", b"prompt", b"slo_ms", b"seed", b"junk"]), st.binary(max_size=40), max_size=5
    )
)
def test_fuzzed_plain_fields_are_either_valid_jobs_or_clean_errors(fields):
    try:
        parse_job(Entry("1-0", None, fields), CFG, KEYS)
    except MessageError as exc:
        assert exc.code in ("malformed", "invalid_request", "prompt_too_long", "unknown_model")
