"""Message schemas and the router's decoder/validation, including a hypothesis fuzz.

Longer than 500 lines on purpose: every message type's pinned bytes, its fuzz and the router's decoder
in one place, so a wire change is reviewed against all of them at once."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.config import Keys
from common.messages import (
    E_INVALID,
    E_MALFORMED,
    E_MODEL,
    E_OVERLOADED,
    SCHEMA_VERSION,
    Admitted,
    BlobRef,
    Cancel,
    Completion,
    DeadLetter,
    FinalResult,
    Job,
    LightReady,
    LightReason,
    LightResult,
    Message,
    MessageError,
    Plan,
    Progress,
    Role,
    RoutedBy,
    RoutedJob,
    Status,
    unpack,
)
from common.streams import Entry
from services.router import RouterConfig, parse_job

CFG = RouterConfig(instance_id="test")
KEYS = Keys()


def _entry(payload: bytes | None = None, fields: dict | None = None) -> Entry:
    return Entry("1-0", payload, fields or ({b"m": payload} if payload is not None else {}))


def test_round_trip_of_every_message_type():
    job = RoutedJob(
        job_id="j1", prompt="a cat", arrival_ms=1.0, deadline_ms=5001.0, seed=7, reply_to="diffserve:reply:x"
    )
    messages = [
        Job(job_id="j1", prompt="a cat", slo_ms=300.0, seed=3),
        job,
        LightResult(
            job=job, image=b"\x89PNG", image_format="png", thumbnail=b"\x00" * 12, thumbnail_size=2, model="sdturbo"
        ),
        Completion.answer(job, b"img", image_format="png", answered_by=Role.HEAVY, model="sdv15", confidence=0.2),
        FinalResult(
            job_id="j1",
            status="ok",
            image=b"img",
            image_format="png",
            answered_by="light",
            model="sdturbo",
            confidence=0.9,
            latency_ms=12.5,
            slo_met=True,
        ),
        Plan(version=3, roles={"w1": "light"}, threshold=0.35),
        Job(job_id="j2", prompt="a dog", reply_to="diffserve:reply:x", partials=True),
        LightReady(job_id="j1", image=b"\x89PNG", image_format="png", model="sdturbo", confidence=0.2, ready_ms=5.0),
        Completion.cancelled(job, "w1"),
        Job(job_id="j3", prompt="a fox", negative_prompt="blur", progress=True, reply_to="diffserve:reply:x"),
        RoutedJob(
            job_id="j3", prompt="a fox", arrival_ms=1.0, deadline_ms=2.0, seed=1, negative_prompt="blur", progress=True
        ),
        Admitted(job_id="j3", queue="heavy", ahead=4, wait_ms=120.5),
        Progress(job_id="j3", step=12, steps=50, model="sdv15"),
    ]
    ref = BlobRef(key="j1/light", size=524288, format="png", digest="ab" * 32)
    by_ref = RoutedJob(
        job_id="j1",
        prompt="a cat",
        arrival_ms=1.0,
        deadline_ms=5.0,
        seed=7,
        image_ref=True,
        partials=True,
        light_ref=ref,
    )
    referring = [
        Job(job_id="j1", prompt="a cat", image_ref=True),
        by_ref,
        LightResult(job=by_ref, image_format="png", image_ref=ref, thumbnail_ref=ref, thumbnail_size=224),
        Completion.answer(by_ref, ref, image_format="png", answered_by=Role.LIGHT, model="sdturbo", confidence=0.9),
        Completion.failure(by_ref, E_MODEL, "boom"),
        FinalResult(job_id="j1", status=Status.OK, image_ref=ref, image_format="png"),
        LightReady(job_id="j1", image_format="png", image_ref=ref),
    ]
    for message in messages + referring:
        decoded = type(message).decode(message.encode())
        assert decoded == message
        # Written at the lowest version that carries it: a blob reference anywhere makes it v2.
        carries_ref = b"digest" in message.encode()
        assert unpack(message.encode())["v"] == (SCHEMA_VERSION if carries_ref else 1)
    assert Completion.answer(by_ref, ref, image_format="png", answered_by=Role.LIGHT, model="sdturbo").blobs == [
        "j1/light"
    ]


def test_fields_added_later_are_on_the_wire_only_when_used():
    """Job/RoutedJob negative_prompt and progress, like FinalResult.retry_after_ms: absent at their default
    (older messages keep their bytes, older readers never see them), present when set."""
    plain = unpack(Job(job_id="j1", prompt="a cat").encode())
    assert "negative_prompt" not in plain and "progress" not in plain
    used = unpack(Job(job_id="j1", prompt="a cat", negative_prompt="dog", progress=True).encode())
    assert used["negative_prompt"] == "dog" and used["progress"] is True
    nested = unpack(LightResult(job=_JOB, image=b"x", image_format="png").encode())["job"]
    assert "progress" not in nested and "v" not in nested


def test_unknown_fields_are_ignored_and_newer_versions_refused():
    body = Job(job_id="j1", prompt="a cat").to_dict()
    assert Job.from_dict({**body, "future_field": [1, 2]}) == Job(job_id="j1", prompt="a cat")
    with pytest.raises(MessageError):
        Job.from_dict({**body, "v": SCHEMA_VERSION + 1})
    with pytest.raises(MessageError):
        Job.from_dict({**body, "type": "plan"})


def test_partials_and_light_ready_are_backward_compatible():
    """An older producer's job (no partials) still decodes; a reader that only knows FinalResult
    refuses a LightReady by its type (the client skips such entries), never mistakes it for a result."""
    old = Job(job_id="j1", prompt="a cat").to_dict()
    del old["partials"]
    assert Job.from_dict(old).partials is False
    with pytest.raises(MessageError):
        FinalResult.decode(LightReady(job_id="j1", image=b"img", image_format="png").encode())
    cancelled = Completion.cancelled(
        RoutedJob(job_id="j1", prompt="a cat", arrival_ms=1.0, deadline_ms=2.0, seed=7), "w1"
    )
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
    job = parse_job(_entry(Job(job_id="a2", prompt="a fox", image_format="webp").encode()), CFG, KEYS)
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


# Encodings produced by the code before the message enums and keyword-only fields (HEAD 383655d):
# the wire format must not move by a byte.
_JOB = RoutedJob(job_id="j1", prompt="a cat", arrival_ms=1.0, deadline_ms=5001.0, seed=7, reply_to="diffserve:reply:x")
_FULL = RoutedJob(
    job_id="j2",
    prompt="a dog",
    arrival_ms=2.5,
    deadline_ms=3000.0,
    seed=42,
    image_format="webp",
    image_quality=80,
    reply_to="diffserve:reply:y",
    confidence=0.25,
    light_image=b"\x89PNG",
    light_image_format="png",
    routed_by=RoutedBy.DIRECT,
    partials=True,
    prompt_index=17,
)
# Blob references (v2): pinned when they were added, like the v1 samples above.
_REF = BlobRef(key="j2.light", size=524288, format="png", digest="9f" * 32)
_HEAVY = BlobRef(key="j2.heavy", size=524288, format="png", digest="0a" * 32)
_BY_REF = RoutedJob(
    job_id="j2",
    prompt="a dog",
    arrival_ms=2.5,
    deadline_ms=3000.0,
    seed=42,
    reply_to="diffserve:reply:y",
    confidence=0.25,
    partials=True,
    image_ref=True,
    light_ref=_REF,
)
FIXED_SAMPLES: list[tuple[Message, str]] = [
    (
        Job(job_id="j1", prompt="a cat"),
        # job_min
        "8da66a6f625f6964a26a31a670726f6d7074a56120636174a6736c6f5f6d73c0a473656564c0ac696d6167655f666f726d6174a3"
        "706e67ad696d6167655f7175616c6974795aa87265706c795f746fc0ac7375626d69747465645f6d73c0a763617363616465c0a8"
        "7061727469616c73c2ac70726f6d70745f696e646578c0a17601a474797065a36a6f62",
    ),
    (
        Job(
            job_id="j2",
            prompt="a dog",
            slo_ms=300.0,
            seed=3,
            image_format="jpeg",
            image_quality=70,
            reply_to="diffserve:reply:x",
            submitted_ms=12.5,
            cascade="sdturbo",
            partials=True,
            prompt_index=4,
        ),
        # job_full
        "8da66a6f625f6964a26a32a670726f6d7074a56120646f67a6736c6f5f6d73cb4072c00000000000a47365656403ac696d616765"
        "5f666f726d6174a46a706567ad696d6167655f7175616c69747946a87265706c795f746fb16469666673657276653a7265706c79"
        "3a78ac7375626d69747465645f6d73cb4029000000000000a763617363616465a77364747572626fa87061727469616c73c3ac70"
        "726f6d70745f696e64657804a17601a474797065a36a6f62",
    ),
    (
        _JOB,
        # routed_min
        "de0010a66a6f625f6964a26a31a670726f6d7074a56120636174aa6172726976616c5f6d73cb3ff0000000000000ab646561646c"
        "696e655f6d73cb40b3890000000000a47365656407ac696d6167655f666f726d6174a3706e67ad696d6167655f7175616c697479"
        "5aa87265706c795f746fb16469666673657276653a7265706c793a78aa636f6e666964656e6365c0ab6c696768745f696d616765"
        "c0b26c696768745f696d6167655f666f726d6174c0a9726f757465645f6279a763617363616465a87061727469616c73c2ac7072"
        "6f6d70745f696e646578c0a17601a474797065aa726f757465645f6a6f62",
    ),
    (
        _FULL,
        # routed_full
        "de0010a66a6f625f6964a26a32a670726f6d7074a56120646f67aa6172726976616c5f6d73cb4004000000000000ab646561646c"
        "696e655f6d73cb40a7700000000000a4736565642aac696d6167655f666f726d6174a477656270ad696d6167655f7175616c6974"
        "7950a87265706c795f746fb16469666673657276653a7265706c793a79aa636f6e666964656e6365cb3fd0000000000000ab6c69"
        "6768745f696d616765c40489504e47b26c696768745f696d6167655f666f726d6174a3706e67a9726f757465645f6279a6646972"
        "656374a87061727469616c73c3ac70726f6d70745f696e64657811a17601a474797065aa726f757465645f6a6f62",
    ),
    (
        LightResult(
            job=_FULL,
            image=b"\x89PNG",
            image_format="png",
            thumbnail=b"\x00" * 12,
            thumbnail_size=2,
            worker_id="w1",
            model="sdturbo",
            batch_size=4,
            light_ms=31.5,
        ),
        # light_result
        "8ba36a6f628ea66a6f625f6964a26a32a670726f6d7074a56120646f67aa6172726976616c5f6d73cb4004000000000000ab6465"
        "61646c696e655f6d73cb40a7700000000000a4736565642aac696d6167655f666f726d6174a477656270ad696d6167655f717561"
        "6c69747950a87265706c795f746fb16469666673657276653a7265706c793a79aa636f6e666964656e6365cb3fd0000000000000"
        "ab6c696768745f696d616765c40489504e47b26c696768745f696d6167655f666f726d6174a3706e67a9726f757465645f6279a6"
        "646972656374a87061727469616c73c3ac70726f6d70745f696e64657811a5696d616765c40489504e47ac696d6167655f666f72"
        "6d6174a3706e67a97468756d626e61696cc40c000000000000000000000000ae7468756d626e61696c5f73697a6502a9776f726b"
        "65725f6964a27731a56d6f64656ca77364747572626faa62617463685f73697a6504a86c696768745f6d73cb403f800000000000"
        "a17601a474797065ac6c696768745f726573756c74",
    ),
    (
        dataclasses.replace(
            Completion.answer(
                _JOB, b"img", image_format="png", answered_by=Role.HEAVY, model="sdv15", confidence=0.2, worker_id="w2"
            ),
            degraded=True,
        ),
        # completion_answer
        "de0010a66a6f625f6964a26a31aa6172726976616c5f6d73cb3ff0000000000000ab646561646c696e655f6d73cb40b389000000"
        "0000a87265706c795f746fb16469666673657276653a7265706c793a78a6737461747573a26f6ba5696d616765c403696d67ac69"
        "6d6167655f666f726d6174a3706e67ab616e7377657265645f6279a56865617679a56d6f64656ca57364763135aa636f6e666964"
        "656e6365cb3fc999999999999aa86465677261646564c3aa6572726f725f636f6465c0ad6572726f725f6d657373616765c0a977"
        "6f726b65725f6964a27732a17601a474797065aa636f6d706c6574696f6e",
    ),
    (
        Completion.failure(_JOB, E_MODEL, "boom", "w3"),
        # completion_failure
        "de0010a66a6f625f6964a26a31aa6172726976616c5f6d73cb3ff0000000000000ab646561646c696e655f6d73cb40b389000000"
        "0000a87265706c795f746fb16469666673657276653a7265706c793a78a6737461747573a56572726f72a5696d616765c0ac696d"
        "6167655f666f726d6174c0ab616e7377657265645f6279c0a56d6f64656cc0aa636f6e666964656e6365c0a86465677261646564"
        "c2aa6572726f725f636f6465ab6d6f64656c5f6572726f72ad6572726f725f6d657373616765a4626f6f6da9776f726b65725f69"
        "64a27733a17601a474797065aa636f6d706c6574696f6e",
    ),
    (
        Completion.cancelled(_JOB, "w1"),
        # completion_cancelled
        "de0010a66a6f625f6964a26a31aa6172726976616c5f6d73cb3ff0000000000000ab646561646c696e655f6d73cb40b389000000"
        "0000a87265706c795f746fb16469666673657276653a7265706c793a78a6737461747573a963616e63656c6c6564a5696d616765"
        "c0ac696d6167655f666f726d6174c0ab616e7377657265645f6279c0a56d6f64656cc0aa636f6e666964656e6365c0a864656772"
        "61646564c2aa6572726f725f636f6465a963616e63656c6c6564ad6572726f725f6d657373616765d92563616e63656c6c656420"
        "62792074686520636c69656e74206265666f72652069742072616ea9776f726b65725f6964a27731a17601a474797065aa636f6d"
        "706c6574696f6e",
    ),
    (
        FinalResult(
            job_id="j1",
            status=Status.OK,
            image=b"img",
            image_format="png",
            answered_by=Role.LIGHT,
            model="sdturbo",
            confidence=0.9,
            latency_ms=12.5,
            slo_met=True,
            finished_ms=99.0,
        ),
        # final_ok
        "8fa66a6f625f6964a26a31a6737461747573a26f6ba5696d616765c403696d67ac696d6167655f666f726d6174a3706e67ab616e"
        "7377657265645f6279a56c69676874a56d6f64656ca77364747572626faa636f6e666964656e6365cb3feccccccccccccda86465"
        "677261646564c2aa6c6174656e63795f6d73cb4029000000000000a7736c6f5f6d6574c3aa6572726f725f636f6465c0ad657272"
        "6f725f6d657373616765c0ab66696e69736865645f6d73cb4058c00000000000a17601a474797065ac66696e616c5f726573756c"
        "74",
    ),
    (
        FinalResult(job_id="j1", status=Status.ERROR, error_code=E_OVERLOADED, error_message="busy", finished_ms=5.0),
        # final_error
        "8fa66a6f625f6964a26a31a6737461747573a56572726f72a5696d616765c0ac696d6167655f666f726d6174c0ab616e73776572"
        "65645f6279c0a56d6f64656cc0aa636f6e666964656e6365c0a86465677261646564c2aa6c6174656e63795f6d73c0a7736c6f5f"
        "6d6574c0aa6572726f725f636f6465aa6f7665726c6f61646564ad6572726f725f6d657373616765a462757379ab66696e697368"
        "65645f6d73cb4014000000000000a17601a474797065ac66696e616c5f726573756c74",
    ),
    (
        LightReady(job_id="j1", image=b"\x89PNG", image_format="png", model="sdturbo", confidence=0.2, ready_ms=5.0),
        # light_ready
        "88a66a6f625f6964a26a31a5696d616765c40489504e47ac696d6167655f666f726d6174a3706e67a56d6f64656ca77364747572"
        "626faa636f6e666964656e6365cb3fc999999999999aa872656164795f6d73cb4014000000000000a17601a474797065ab6c6967"
        "68745f7265616479",
    ),
    (
        DeadLetter(
            stream="diffserve:jobs", entry_id="1-0", error_code=E_MALFORMED, error_message="bad", raw=b"\x01\x02"
        ),
        # dead_letter
        "87a673747265616dae6469666673657276653a6a6f6273a8656e7472795f6964a3312d30aa6572726f725f636f6465a96d616c66"
        "6f726d6564ad6572726f725f6d657373616765a3626164a3726177c4020102a17601a474797065ab646561645f6c6574746572",
    ),
    (
        Plan(),
        # plan_default
        "de0012a776657273696f6e00a6706f6c696379a9646966667365727665a97468726573686f6c64cb3fe0000000000000ab6c6967"
        "68745f626174636804ab68656176795f626174636801ad6c696768745f776f726b65727300ad68656176795f776f726b65727300"
        "ae68656176795f6672616374696f6ecb0000000000000000a5726f6c657380aa64656d616e645f717073cb0000000000000000a8"
        "6665617369626c65c3a96f626a656374697665a77175616c697479b1657374696d617465645f7175616c697479c0aa6372656174"
        "65645f6d73cb0000000000000000b46469736372696d696e61746f725f726f75746573c3ac646567726164655f6c617465c3a176"
        "01a474797065a4706c616e",
    ),
    (
        Plan(
            version=3,
            policy="clipper",
            threshold=0.35,
            light_batch=8,
            heavy_batch=2,
            light_workers=3,
            heavy_workers=1,
            heavy_fraction=0.1,
            roles={"w1": Role.LIGHT, "w2": Role.HEAVY},
            demand_qps=4.5,
            feasible=False,
            objective="throughput",
            estimated_quality=0.7,
            created_ms=123.0,
            discriminator_routes=False,
            degrade_late=False,
        ),
        # plan_full
        "de0012a776657273696f6e03a6706f6c696379a7636c6970706572a97468726573686f6c64cb3fd6666666666666ab6c69676874"
        "5f626174636808ab68656176795f626174636802ad6c696768745f776f726b65727303ad68656176795f776f726b65727301ae68"
        "656176795f6672616374696f6ecb3fb999999999999aa5726f6c657382a27731a56c69676874a27732a56865617679aa64656d61"
        "6e645f717073cb4012000000000000a86665617369626c65c2a96f626a656374697665aa7468726f756768707574b1657374696d"
        "617465645f7175616c697479cb3fe6666666666666aa637265617465645f6d73cb405ec00000000000b46469736372696d696e61"
        "746f725f726f75746573c2ac646567726164655f6c617465c2a17601a474797065a4706c616e",
    ),
    # Fields added later (Message.LATER) are on the wire only when set; these pin them.
    (
        Completion.answer(
            _JOB,
            b"img",
            image_format="png",
            answered_by=Role.LIGHT,
            model="sdturbo",
            confidence=0.12,
            worker_id="d1",
            light_reason=LightReason.PLAN,
        ),
        # completion_light_reason
        "de0011a66a6f625f6964a26a31aa6172726976616c5f6d73cb3ff0000000000000ab646561646c696e655f6d73cb40b3890000000000"
        "a87265706c795f746fb16469666673657276653a7265706c793a78a6737461747573a26f6ba5696d616765c403696d67ac696d616765"
        "5f666f726d6174a3706e67ab616e7377657265645f6279a56c69676874a56d6f64656ca77364747572626faa636f6e666964656e6365"
        "cb3fbeb851eb851eb8a86465677261646564c3aa6572726f725f636f6465c0ad6572726f725f6d657373616765c0a9776f726b65725f"
        "6964a26431ac6c696768745f726561736f6ea4706c616ea17601a474797065aa636f6d706c6574696f6e",
    ),
    (
        FinalResult(
            job_id="j1",
            status=Status.OK,
            image=b"img",
            image_format="png",
            answered_by=Role.LIGHT,
            model="sdturbo",
            confidence=0.12,
            degraded=True,
            latency_ms=900.0,
            slo_met=True,
            finished_ms=5.0,
            light_reason=LightReason.DEADLINE,
        ),
        # final_result_light_reason
        "de0010a66a6f625f6964a26a31a6737461747573a26f6ba5696d616765c403696d67ac696d6167655f666f726d6174a3706e67ab616e"
        "7377657265645f6279a56c69676874a56d6f64656ca77364747572626faa636f6e666964656e6365cb3fbeb851eb851eb8a864656772"
        "61646564c3aa6c6174656e63795f6d73cb408c200000000000a7736c6f5f6d6574c3aa6572726f725f636f6465c0ad6572726f725f6d"
        "657373616765c0ab66696e69736865645f6d73cb4014000000000000ac6c696768745f726561736f6ea8646561646c696e65a17601a4"
        "74797065ac66696e616c5f726573756c74",
    ),
    (
        Plan(version=2, threshold=0.04, target_threshold=0.21, reason="t=0.04 < the cascade's 0.21"),
        # plan_target_and_reason
        "de0014a776657273696f6e02a6706f6c696379a9646966667365727665a97468726573686f6c64cb3fa47ae147ae147bab6c69676874"
        "5f626174636804ab68656176795f626174636801ad6c696768745f776f726b65727300ad68656176795f776f726b65727300ae686561"
        "76795f6672616374696f6ecb0000000000000000a5726f6c657380aa64656d616e645f717073cb0000000000000000a8666561736962"
        "6c65c3a96f626a656374697665a77175616c697479b1657374696d617465645f7175616c697479c0aa637265617465645f6d73cb0000"
        "000000000000b46469736372696d696e61746f725f726f75746573c3ac646567726164655f6c617465c3b07461726765745f74687265"
        "73686f6c64cb3fcae147ae147ae1a6726561736f6ebb743d302e3034203c207468652063617363616465277320302e3231a17601a474"
        "797065a4706c616e",
    ),
    (
        Job(job_id="j1", prompt="a cat", image_ref=True),
        # job_image_ref
        "8ea66a6f625f6964a26a31a670726f6d7074a56120636174a6736c6f5f6d73c0a473656564c0ac696d6167655f666f726d6174a3"
        "706e67ad696d6167655f7175616c6974795aa87265706c795f746fc0ac7375626d69747465645f6d73c0a763617363616465c0a8"
        "7061727469616c73c2ac70726f6d70745f696e646578c0a9696d6167655f726566c3a17601a474797065a36a6f62",
    ),
    (
        _BY_REF,
        # routed_light_ref
        "de0012a66a6f625f6964a26a32a670726f6d7074a56120646f67aa6172726976616c5f6d73cb4004000000000000ab646561646c"
        "696e655f6d73cb40a7700000000000a4736565642aac696d6167655f666f726d6174a3706e67ad696d6167655f7175616c697479"
        "5aa87265706c795f746fb16469666673657276653a7265706c793a79aa636f6e666964656e6365cb3fd0000000000000ab6c6967"
        "68745f696d616765c0b26c696768745f696d6167655f666f726d6174c0a9726f757465645f6279a763617363616465a870617274"
        "69616c73c3ac70726f6d70745f696e646578c0a9696d6167655f726566c3a96c696768745f72656684a36b6579a86a322e6c6967"
        "6874a473697a65ce00080000a6666f726d6174a3706e67a6646967657374d9403966396639663966396639663966396639663966"
        "3966396639663966396639663966396639663966396639663966396639663966396639663966396639663966a17602a474797065"
        "aa726f757465645f6a6f62",
    ),
    (
        LightResult(
            job=_BY_REF,
            image_format="png",
            image_ref=_REF,
            thumbnail_ref=BlobRef(key="j2.thumb", size=150528, format="rgb"),
            thumbnail_size=224,
            worker_id="w1",
            model="sdturbo",
            batch_size=8,
            light_ms=12.0,
        ),
        # light_result_refs
        "8da36a6f62de0010a66a6f625f6964a26a32a670726f6d7074a56120646f67aa6172726976616c5f6d73cb4004000000000000ab"
        "646561646c696e655f6d73cb40a7700000000000a4736565642aac696d6167655f666f726d6174a3706e67ad696d6167655f7175"
        "616c6974795aa87265706c795f746fb16469666673657276653a7265706c793a79aa636f6e666964656e6365cb3fd00000000000"
        "00ab6c696768745f696d616765c0b26c696768745f696d6167655f666f726d6174c0a9726f757465645f6279a763617363616465"
        "a87061727469616c73c3ac70726f6d70745f696e646578c0a9696d6167655f726566c3a96c696768745f72656684a36b6579a86a"
        "322e6c69676874a473697a65ce00080000a6666f726d6174a3706e67a6646967657374d940396639663966396639663966396639"
        "66396639663966396639663966396639663966396639663966396639663966396639663966396639663966396639663966a5696d"
        "616765c0ac696d6167655f666f726d6174a3706e67a97468756d626e61696cc0ae7468756d626e61696c5f73697a65cce0a9776f"
        "726b65725f6964a27731a56d6f64656ca77364747572626faa62617463685f73697a6508a86c696768745f6d73cb402800000000"
        "0000a9696d6167655f72656684a36b6579a86a322e6c69676874a473697a65ce00080000a6666f726d6174a3706e67a664696765"
        "7374d940396639663966396639663966396639663966396639663966396639663966396639663966396639663966396639663966"
        "39663966396639663966396639663966ad7468756d626e61696c5f72656684a36b6579a86a322e7468756d62a473697a65ce0002"
        "4c00a6666f726d6174a3726762a6646967657374a0a17602a474797065ac6c696768745f726573756c74",
    ),
    (
        Completion.answer(
            _BY_REF, _HEAVY, image_format="png", answered_by=Role.HEAVY, model="sdv15", confidence=0.25, worker_id="w2"
        ),
        # completion_ref
        "de0014a66a6f625f6964a26a32aa6172726976616c5f6d73cb4004000000000000ab646561646c696e655f6d73cb40a770000000"
        "0000a87265706c795f746fb16469666673657276653a7265706c793a79a6737461747573a26f6ba5696d616765c0ac696d616765"
        "5f666f726d6174a3706e67ab616e7377657265645f6279a56865617679a56d6f64656ca57364763135aa636f6e666964656e6365"
        "cb3fd0000000000000a86465677261646564c2aa6572726f725f636f6465c0ad6572726f725f6d657373616765c0a9776f726b65"
        "725f6964a27732a9696d6167655f72656684a36b6579a86a322e6865617679a473697a65ce00080000a6666f726d6174a3706e67"
        "a6646967657374d94030613061306130613061306130613061306130613061306130613061306130613061306130613061306130"
        "613061306130613061306130613061306130613061a662795f726566c3a87061727469616c73c3a5626c6f627392a86a322e6c69"
        "676874a86a322e6865617679a17602a474797065aa636f6d706c6574696f6e",
    ),
    (
        FinalResult(
            job_id="j2",
            status=Status.OK,
            image_format="png",
            answered_by=Role.HEAVY,
            model="sdv15",
            confidence=0.25,
            latency_ms=80.0,
            slo_met=True,
            finished_ms=99.0,
            image_ref=_HEAVY,
        ),
        # final_ref
        "de0010a66a6f625f6964a26a32a6737461747573a26f6ba5696d616765c0ac696d6167655f666f726d6174a3706e67ab616e7377"
        "657265645f6279a56865617679a56d6f64656ca57364763135aa636f6e666964656e6365cb3fd0000000000000a8646567726164"
        "6564c2aa6c6174656e63795f6d73cb4054000000000000a7736c6f5f6d6574c3aa6572726f725f636f6465c0ad6572726f725f6d"
        "657373616765c0ab66696e69736865645f6d73cb4058c00000000000a9696d6167655f72656684a36b6579a86a322e6865617679"
        "a473697a65ce00080000a6666f726d6174a3706e67a6646967657374d94030613061306130613061306130613061306130613061"
        "306130613061306130613061306130613061306130613061306130613061306130613061306130613061a17602a474797065ac66"
        "696e616c5f726573756c74",
    ),
    (
        LightReady(job_id="j2", image_format="png", model="sdturbo", confidence=0.25, ready_ms=5.0, image_ref=_REF),
        # light_ready_ref
        "89a66a6f625f6964a26a32a5696d616765c0ac696d6167655f666f726d6174a3706e67a56d6f64656ca77364747572626faa636f"
        "6e666964656e6365cb3fd0000000000000a872656164795f6d73cb4014000000000000a9696d6167655f72656684a36b6579a86a"
        "322e6c69676874a473697a65ce00080000a6666f726d6174a3706e67a6646967657374d940396639663966396639663966396639"
        "66396639663966396639663966396639663966396639663966396639663966396639663966396639663966396639663966a17602"
        "a474797065ab6c696768745f7265616479",
    ),
    # Added by issue 24: a cancel request on a submission stream, and an answer echoing its job's reply token.
    (Cancel(job_id="j1"), "83a66a6f625f6964a26a31a17601a474797065a663616e63656c"),
    (
        FinalResult(job_id="j1", status=Status.OK, reply_token="ab12"),
        "de0010a66a6f625f6964a26a31a6737461747573a26f6ba5696d616765c0ac696d6167655f666f726d6174c0ab616e7377657265"
        "645f6279c0a56d6f64656cc0aa636f6e666964656e6365c0a86465677261646564c2aa6c6174656e63795f6d73c0a7736c6f5f6d"
        "6574c0aa6572726f725f636f6465c0ad6572726f725f6d657373616765c0ab66696e69736865645f6d73cb0000000000000000ab"
        "7265706c795f746f6b656ea461623132a17601a474797065ac66696e616c5f726573756c74",
    ),
]


@pytest.mark.parametrize("message, encoded", FIXED_SAMPLES)
def test_encoding_is_byte_for_byte_the_fixed_sample(message, encoded):
    assert message.encode() == bytes.fromhex(encoded)
    decoded = type(message).decode(bytes.fromhex(encoded))
    assert decoded == message
    assert decoded.encode() == bytes.fromhex(encoded)


def test_enum_fields_decode_to_members_and_refuse_unknown_values():
    result = FinalResult.decode(bytes.fromhex(FIXED_SAMPLES[8][1]))
    assert result.status is Status.OK and result.answered_by is Role.LIGHT
    assert RoutedJob.decode(_FULL.encode()).routed_by is RoutedBy.DIRECT
    # plain strings from an older producer are the same on the wire
    assert FinalResult(job_id="j1", status="ok").encode() == FinalResult(job_id="j1", status=Status.OK).encode()
    with pytest.raises(MessageError) as err:
        FinalResult.from_dict({"job_id": "j1", "status": "maybe"})
    assert err.value.code == E_INVALID and err.value.job_id == "j1"
    with pytest.raises(MessageError):
        Completion.from_dict({**Completion.cancelled(_JOB).to_dict(), "answered_by": "medium"})


def test_construction_is_keyword_only():
    with pytest.raises(TypeError):
        FinalResult("j1", "ok")
    with pytest.raises(TypeError):
        RoutedJob("j1", "a cat", 1.0, 2.0, 7)


def test_a_malformed_blob_reference_is_refused_with_the_job_id():
    good = FinalResult(job_id="j1", status=Status.OK, image_ref=_HEAVY).to_dict()
    assert FinalResult.from_dict(good).image_ref == _HEAVY
    for bad in (
        {"key": "", "size": 1, "format": "png"},
        {"key": "k", "size": -1, "format": "png"},
        {"key": "k", "size": 1, "format": "tiff"},
        {"key": "k" * 300, "size": 1, "format": "png"},
        "k",
    ):
        with pytest.raises(MessageError) as err:
            FinalResult.from_dict({**good, "image_ref": bad})
        assert err.value.code == E_INVALID and err.value.job_id == "j1"


def test_a_job_digest_names_the_request_not_the_attempt():
    """Same request sent again (another attempt, another ``submitted_ms``): same digest; any other field
    (the reply target or token included) makes it another request."""
    base = Job(job_id="j1", prompt="a cat", reply_to="diffserve:reply:x", reply_token="t1", submitted_ms=1.0)
    assert Job(**{**base.__dict__, "submitted_ms": 2.0, "job_id": "other"}).digest() == base.digest()
    for change in ({"prompt": "a dog"}, {"reply_to": "diffserve:reply:y"}, {"reply_token": "t2"}, {"seed": 1}):
        assert Job(**{**base.__dict__, **change}).digest() != base.digest(), change


def test_the_router_reads_a_cancel_request_in_either_form():
    from services.router import parse_entry

    for entry in (_entry(Cancel(job_id="c1").encode()), _entry(fields={b"type": b"cancel", b"job_id": b"c1"})):
        assert parse_entry(entry, CFG, KEYS) == Cancel(job_id="c1")
    with pytest.raises(MessageError):
        parse_entry(_entry(fields={b"type": b"cancel", b"job_id": b"bad id!"}), CFG, KEYS)
