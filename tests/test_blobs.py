"""The image store (common/blobs.py): Redis (one server or shards), S3 against a real loopback S3 server
(moto's, started here) and a shared directory, and whole profiled stacks whose images go through each:
exactly once, fetchable, nothing left behind without an expiry, a store that is down answered with
internal_error."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import redis

from common.blobs import NAME_MAX, BlobUnavailable, FileBlobs, blob_key, digest, file_name, in_memory, open_store
from common.client import Client
from common.config import Keys, RedisSettings
from common.localstack import LocalStack, RedisServer, StackSpec, free_port
from common.messages import BlobRef, LightReady
from common.profiles import load_prompts

KEYS = Keys()
BUCKET = "diffserve-test"


@pytest.fixture(scope="module")
def s3_env():
    """A loopback S3-compatible server (moto) with a bucket; the AWS_* settings that reach it."""
    moto_server = pytest.importorskip("moto.server")
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
    }
    client = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=BUCKET)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def _items(n: int, size: int, kind: str = "light") -> list[tuple[str, bytes, str, str]]:
    out = []
    for i in range(n):
        data = bytes([i % 251]) * size
        out.append((blob_key(f"job-{i}", kind), data, "png", digest(data)))
    return out


def test_redis_shards_hold_each_image_once_with_an_expiry_and_small_ones_stay_inline():
    servers = [RedisServer().start() for _ in range(2)]
    try:
        settings = RedisSettings(blob_url=",".join(s.url for s in servers), blob_ttl_s=600, blob_min_bytes=100)

        async def go():
            store = open_store(settings)
            try:
                kept = await store.keep(_items(20, 1000) + [("tiny.light", b"x" * 10, "png", "")])
                refs = [k for k in kept if isinstance(k, BlobRef)]
                first = await store.read(refs[:5])
                taken = await store.read(refs[5:10], take=True)
                wrong = await store.read([BlobRef(key=refs[10].key, size=999, format="png")])
                left = sorted(await store.keys())
                return kept, refs, first, taken, wrong, left
            finally:
                await store.close()

        kept, refs, first, taken, wrong, left = asyncio.run(go())
        assert kept[-1] == b"x" * 10 and len(refs) == 20  # under blob_min_bytes: inline
        assert refs[0] == BlobRef(key="job-0.light", size=1000, format="png", digest=digest(bytes([0]) * 1000))
        assert first == [bytes([i]) * 1000 for i in range(5)] and taken == [bytes([i]) * 1000 for i in range(5, 10)]
        assert wrong == [None]  # not what the reference says: never handed out as the image
        assert left == sorted(r.key for r in refs[:5] + refs[10:])
        per_shard = [[k for k in redis.Redis.from_url(s.url).scan_iter("diffserve:blob:*")] for s in servers]
        assert all(per_shard) and sum(map(len, per_shard)) == 15  # both shards used, each key on one
        for server, names in zip(servers, per_shard, strict=False):
            assert all(0 < redis.Redis.from_url(server.url).ttl(n) <= 600 for n in names)
    finally:
        for s in servers:
            s.stop()


def test_a_store_that_does_not_answer_raises_unavailable_within_its_timeout():
    settings = RedisSettings(blob_url=f"redis://127.0.0.1:{free_port()}/0", blob_timeout_s=0.5, blob_min_bytes=1)

    async def go():
        store = open_store(settings)
        start = time.monotonic()
        try:
            with pytest.raises(BlobUnavailable, match="image store is unavailable"):
                await store.keep(_items(1, 10))
            return time.monotonic() - start
        finally:
            await store.close()

    assert asyncio.run(go()) < 3


def test_s3_store_on_a_loopback_server_reads_signs_deletes_and_sweeps_what_outlived_its_ttl(s3_env):
    settings = RedisSettings(blob_url=f"s3://{BUCKET}/unit", blob_ttl_s=1, blob_min_bytes=1)

    async def go():
        store = open_store(settings)
        kept = await store.keep(_items(6, 2000))
        refs = [k for k in kept if isinstance(k, BlobRef)]
        read = await store.read(refs[:2])
        taken = await store.read(refs[2:4], take=True)
        url = await store.url(refs[4], 60)
        async with httpx.AsyncClient() as http:  # presigned: no credentials needed
            signed = (await http.get(url)).content
        before = sorted(await store.keys())
        await asyncio.sleep(2.2)  # older than the TTL now
        swept = await store.maybe_sweep()
        return refs, read, taken, url, signed, before, swept, await store.keys()

    refs, read, taken, url, signed, before, swept, after = asyncio.run(go())
    assert read == [bytes([0]) * 2000, bytes([1]) * 2000] and taken == [bytes([2]) * 2000, bytes([3]) * 2000]
    assert before == sorted(r.key for r in refs[:2] + refs[4:])
    assert "X-Amz-Signature=" in url and signed == bytes([4]) * 2000
    assert swept == 4 and after == []


@pytest.fixture(params=["disk", "memory"])
def blob_dir(request, tmp_path):
    """A directory for the file store on each kind of file system it tells apart: the I/O in a thread
    (disk: it could block), or inline (tmpfs)."""
    if request.param == "disk":
        if in_memory(str(tmp_path)):
            pytest.skip("the temporary directory is in memory here")
        yield tmp_path / "blobs"
        return
    if not in_memory("/dev/shm"):
        pytest.skip("no tmpfs at /dev/shm")
    with tempfile.TemporaryDirectory(prefix="test-blobs-", dir="/dev/shm") as root:
        yield Path(root) / "blobs"


def test_file_store_reads_takes_once_expires_and_sweeps_what_outlived_its_ttl(blob_dir):
    root = blob_dir
    settings = RedisSettings(blob_url=f"file://{root}", blob_ttl_s=1, blob_min_bytes=100)

    async def go():
        store, rival = open_store(settings), open_store(settings)
        assert isinstance(store, FileBlobs) and store.inline == (root.parts[1:3] == ("dev", "shm"))
        kept = await store.keep(_items(8, 1000) + [("tiny.light", b"x" * 10, "png", "")])
        refs = [k for k in kept if isinstance(k, BlobRef)]
        read = await store.read(refs[:2])
        # Two takers of the same images (two processes' stores): each image goes to exactly one of them.
        mine, theirs = await asyncio.gather(store.read(refs[2:6], take=True), rival.read(refs[2:6], take=True))
        wrong = await store.read([BlobRef(key=refs[6].key, size=999, format="png")])
        before = sorted(await store.keys())
        (root / ".tmp-left-by-a-crash").write_bytes(b"half")
        await asyncio.sleep(2.2)  # older than the TTL now
        expired = await store.read(refs[6:])
        swept = await store.maybe_sweep()
        return kept, refs, read, mine, theirs, wrong, before, expired, swept, await store.keys()

    kept, refs, read, mine, theirs, wrong, before, expired, swept, after = asyncio.run(go())
    assert kept[-1] == b"x" * 10 and len(refs) == 8  # under blob_min_bytes: inline
    assert read == [bytes([0]) * 1000, bytes([1]) * 1000]
    assert [a or b for a, b in zip(mine, theirs, strict=True)] == [bytes([i]) * 1000 for i in range(2, 6)]
    assert not any(a and b for a, b in zip(mine, theirs, strict=True))
    assert wrong == [None]  # not what the reference says: never handed out as the image
    assert before == sorted(r.key for r in refs[:2] + refs[6:])
    assert expired == [None, None]  # past the TTL an image reads as gone, swept or not
    assert swept == 5 and after == [] and os.listdir(root) == []  # the crash's leftover too


def test_file_store_keeps_every_key_inside_its_directory_and_refuses_one_no_file_can_be_named_after(tmp_path):
    root = tmp_path / "blobs"
    settings = RedisSettings(blob_url=f"file://{root}", blob_min_bytes=1)
    unsafe = ["../escaped.light", "/etc/diffserve.light", "..", ".", ".tmp-x", "a/../../b", "t\0.light", "é/x"]
    too_long = "j" * (NAME_MAX + 1)

    async def go():
        store = open_store(settings)
        refs = [k for k in await store.keep([(key, b"data", "png", "") for key in unsafe]) if isinstance(k, BlobRef)]
        with pytest.raises(ValueError, match="no file can be named"):
            await store.keep([(too_long, b"data", "png", "")])
        listed = sorted(await store.keys())
        gone = await store.read([BlobRef(key=too_long, size=4, format="png")])
        taken = await store.read(refs, take=True)
        return listed, gone, taken

    listed, gone, taken = asyncio.run(go())
    assert sorted(os.listdir(tmp_path)) == ["blobs"]  # nothing written beside the directory
    assert listed == sorted(unsafe) and gone == [None] and taken == [b"data"] * len(unsafe)
    assert all("/" not in file_name(key) and not file_name(key).startswith(".") for key in unsafe)
    with pytest.raises(ValueError, match="file:///absolute/directory"):
        open_store(RedisSettings(blob_url="file://relative/dir"))


def _answers(stack: LocalStack, settings: RedisSettings, prompts: list[str], url_jobs: int = 0):
    """Half the prompts with the image inline (the default), half by reference (read and released by the
    client); then ``url_jobs`` through the gateway's url answers, each fetched."""

    async def go():
        async with Client(settings) as client:
            half = len(prompts) // 2
            previews: list[LightReady] = []  # the inline half asks for the light image first
            inline = [
                asyncio.create_task(client.submit(p, timeout=120, on_light=previews.append)) for p in prompts[:half]
            ]
            by_ref = [asyncio.create_task(client.submit(p, timeout=120, image_ref=True)) for p in prompts[half:]]
            inline_results = await asyncio.gather(*inline)
            ref_results = await asyncio.gather(*by_ref)
            read = [await client.image(r, release=True) for r in ref_results]
            delivered = await client.redis.xlen(client.reply_stream)
            return inline_results, ref_results, read, delivered, previews

    inline, by_ref, read, delivered, previews = asyncio.run(go())
    urls = []
    with httpx.Client(base_url=f"http://127.0.0.1:{stack.spec.gateway_port}", timeout=60) as http:
        for i in range(url_jobs):
            r = http.post("/v1/images/generations", json={"prompt": prompts[i], "response_format": "url"})
            r.raise_for_status()
            urls.append(r.json()["data"][0]["url"])
        fetched = [httpx.get(u if u.startswith("http") else http.base_url.join(u)).content for u in urls]
    return inline, by_ref, read, delivered, previews, urls, fetched


def test_the_profiled_model_emits_the_image_of_image_kb_made_once():
    from common.backends import BackendSettings, make_model
    from common.backends.profiled import fixed_image
    from common.imaging import PngImage

    model = make_model(BackendSettings(backend="profiled", image_kb=16, time_scale=0.0), "light")
    images = model.generate(["a fox", "a lighthouse"], [1, 2])
    # the very bytes the worker's encoder sends for it (no placeholder drawn only to be replaced)
    assert images == [fixed_image(16).data] * 2 and all(isinstance(i, PngImage) for i in images)
    plain = make_model(BackendSettings(backend="profiled", time_scale=0.0), "light").generate(["a fox"], [1])
    assert plain[0] != images[0] and len(plain[0]) < 16 * 1024


@pytest.mark.slow
@pytest.mark.parametrize("store", ["redis", "s3", "file"])
def test_a_profiled_stack_answers_100_jobs_exactly_once_through_the_image_store(redis_server, tmp_path, request, store):
    """16 KiB images (stored, not inline): 100 jobs, half answered inline and half by reference, every one
    exactly once with the worker's image; url answers from the gateway are fetchable (presigned on S3);
    afterwards the store holds exactly the url images (an expiry each), nothing else."""
    from common.backends.profiled import fixed_image

    blob_servers = [RedisServer().start() for _ in range(2)] if store == "redis" else []
    env = {"DIFFSERVE_IMAGE_KB": "16", "DIFFSERVE_SLO_MS": "60000"}  # a burst of 100: nothing refused
    if store == "redis":  # two shards of their own: the first scale step
        env["DIFFSERVE_BLOB_URL"] = ",".join(s.url for s in blob_servers)
    elif store == "s3":
        env.update(request.getfixturevalue("s3_env"))
        env["DIFFSERVE_BLOB_URL"] = f"s3://{BUCKET}/e2e"
    else:
        env["DIFFSERVE_BLOB_URL"] = f"file://{tmp_path / 'blobs'}"
    settings = RedisSettings(redis_url=redis_server.url, blob_url=env["DIFFSERVE_BLOB_URL"])
    spec = StackSpec(
        redis_url=redis_server.url, light_workers=1, heavy_workers=1, time_scale=0.02, env=env, gateway_port=free_port()
    )
    try:
        with LocalStack(spec, str(tmp_path / "logs")) as stack:
            inline, by_ref, read, delivered, previews, urls, fetched = _answers(
                stack, settings, load_prompts()[:100], 4
            )

            async def left():
                blobs = open_store(settings)
                try:
                    return sorted(await blobs.keys())
                finally:
                    await blobs.close()

            remaining = asyncio.run(left())
        # The url images stay (their links live for the result TTL), each with an expiry; nothing else does.
        ttls = [redis.Redis.from_url(b.url).ttl(n) for b in blob_servers for n in redis.Redis.from_url(b.url).keys()]
    finally:
        for server in blob_servers:
            server.stop()
    image = fixed_image(16).data
    assert delivered == 100 + len(previews) and len({r.job_id for r in inline + by_ref}) == 100  # + light_ready
    assert [r.status for r in inline + by_ref] == ["ok"] * 100, {r.error_message for r in inline + by_ref}
    assert all(r.image == image and r.image_ref is None for r in inline)
    assert all(r.image is None and r.image_ref and r.image_ref.size == len(image) for r in by_ref)
    assert read == [image] * 50
    heavy = {r.job_id for r in inline if r.answered_by == "heavy"}
    assert {p.job_id for p in previews} == heavy and all(p.image == image for p in previews)
    assert {r.answered_by for r in inline + by_ref} == {"light", "heavy"}
    assert fetched == [image] * 4
    if store == "s3":
        assert all("X-Amz-Signature=" in u for u in urls)
    elif store == "redis":
        assert len(ttls) == 4 and all(t > 0 for t in ttls)
    assert len(remaining) == 4 and all(key.endswith((".light", ".heavy")) for key in remaining)


class _Volume:
    """A shared directory that can go away (unmounted) and come back, as the file store sees it."""

    def __init__(self, root: Path):
        self.root, self.away = root, root.with_name(root.name + "-away")
        self.url = f"file://{root}"

    def stop(self) -> None:
        self.root.rename(self.away)

    def start(self) -> None:
        self.away.rename(self.root)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["redis", "file"])
def test_an_image_store_that_is_down_gets_its_jobs_a_clear_internal_error_and_the_stack_recovers(
    redis_server, tmp_path, kind
):
    """The image store (a Redis of its own, or the shared directory) goes away: jobs get internal_error
    saying so, once each, within the blob timeout; it comes back: the next jobs are served."""
    if kind == "redis":
        store: RedisServer | _Volume = RedisServer().start()
    else:
        (tmp_path / "blobs").mkdir()
        store = _Volume(tmp_path / "blobs")
    env = {
        "DIFFSERVE_IMAGE_KB": "16",
        "DIFFSERVE_BLOB_URL": store.url,
        "DIFFSERVE_BLOB_TIMEOUT_S": "1",
        "DIFFSERVE_SLO_MS": "60000",
    }
    spec = StackSpec(redis_url=redis_server.url, light_workers=1, heavy_workers=1, time_scale=0.02, env=env)
    prompts = load_prompts()[:10]
    try:
        with LocalStack(spec, str(tmp_path / "logs")):

            async def go():
                async with Client(RedisSettings(redis_url=redis_server.url, blob_url=store.url)) as client:
                    await asyncio.to_thread(store.stop)
                    down = await asyncio.gather(*(client.submit(p, timeout=60) for p in prompts[:5]))
                    await asyncio.to_thread(store.start)
                    back = await asyncio.gather(*(client.submit(p, timeout=60) for p in prompts[5:]))
                    return down, back, await client.redis.xlen(client.reply_stream)

            down, back, delivered = asyncio.run(go())
    finally:
        if isinstance(store, RedisServer):
            store.stop()
    assert delivered == 10
    assert {(r.status, r.error_code) for r in down} == {("error", "internal_error")}
    assert all("image store is unavailable" in r.error_message for r in down)
    assert [r.status for r in back] == ["ok"] * 5 and all(len(r.image) == 16 * 1024 for r in back)
