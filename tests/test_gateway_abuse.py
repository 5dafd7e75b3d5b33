"""The gateway under abuse (issue 24: 2, 4, 9, 11), against a real gateway process and its own
redis-server, with raw sockets for slow and idle clients.  No router runs: every request here is
answered (or refused) by the gateway before a job would be served.

New settings are given through the environment (an older gateway ignores them and starts), so each
test shows the behaviour it pins, not a missing flag."""

from __future__ import annotations

import hashlib
import json
import select
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from common.localstack import LocalStack, RedisServer, StackSpec, free_port

pytestmark = pytest.mark.slow

HOLDER, OTHER, RATED, READER, CAPPED = (
    f"sk-{name}-0123456789" for name in ("holder", "other", "rated", "reader", "capped")
)
MAX_CONNECTIONS = 200


def _sha(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Gateway:
    def __init__(self, port: int):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def http(self, key: str | None = None, timeout: float = 10) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=timeout
        )

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("abuse")
    keys = tmp / "keys.json"
    keys.write_text(
        json.dumps(
            {
                "keys": [
                    {"name": "holder", "sha256": _sha(HOLDER), "rpm": 100000, "read_rpm": 100000, "max_in_flight": 0},
                    {"name": "other", "sha256": _sha(OTHER), "rpm": 100000, "read_rpm": 100000, "max_in_flight": 0},
                    {"name": "rated", "sha256": _sha(RATED), "rpm": 30, "burst": 3, "max_in_flight": 0},
                    {"name": "reader", "sha256": _sha(READER), "rpm": 1000, "read_rpm": 60, "max_in_flight": 0},
                    {"name": "capped", "sha256": _sha(CAPPED), "rpm": 1000, "max_in_flight": 2},
                ]
            }
        )
    )
    server = RedisServer().start()
    port = free_port()
    spec = StackSpec(
        redis_url=server.url,
        env={
            "DIFFSERVE_API_KEYS_FILE": str(keys),
            "DIFFSERVE_HEADER_TIMEOUT_S": "1",
            "DIFFSERVE_BODY_TIMEOUT_S": "1",
            "DIFFSERVE_KEEP_ALIVE_S": "1",
            "DIFFSERVE_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
            "DIFFSERVE_READ_RATE_LIMIT_RPM": "600",  # page views: a burst of 60, then 10 a second
        },
    )
    local = LocalStack(spec, str(tmp / "logs"))
    try:
        local.spawn("gateway", "gateway", "--port", str(port))
        local.wait_ready(["gateway"], 60)
        yield Gateway(port)
    finally:
        local.stop()
        server.stop()


def _closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the peer closed ``sock`` (reading and discarding what it sends), None if it did not."""
    start = time.monotonic()
    sock.settimeout(0.1)
    while time.monotonic() - start < seconds:
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - start
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - start
    return None


def _response(sock: socket.socket, timeout: float) -> bytes:
    """Whatever the server sent within ``timeout`` (until it closed, or went quiet after a response)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data or not data.endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


# ---------------------------------------------------------------- 9: slow and idle connections


def test_a_connection_that_sends_nothing_is_closed(gateway):
    with gateway.connect() as sock:
        took = _closed_within(sock, 5)
    assert took is not None and took < 3


def test_a_slow_request_head_is_closed(gateway):
    with gateway.connect() as sock:
        start = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        closed = None
        for piece in (b"Host: x\r\n", b"X-A: 1\r\n", b"X-B: 2\r\n", b"X-C: 3\r\n", b"X-D: 4\r\n", b"X-E: 5\r\n"):
            time.sleep(0.4)  # a byte now and then, never the blank line that ends the head
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                closed = time.monotonic() - start
                break
        if closed is None:
            took = _closed_within(sock, 3)
            closed = None if took is None else time.monotonic() - start
    assert closed is not None and closed < 3.5


def test_a_slow_body_gets_a_408_and_the_connection_closed(gateway):
    with gateway.connect() as sock:
        sock.sendall(
            b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + OTHER.encode()
            + b'\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"prompt": '
        )
        start = time.monotonic()
        answer = _response(sock, 5)
        took = time.monotonic() - start
        closed = _closed_within(sock, 2)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert took < 3 and closed is not None


def test_an_idle_keep_alive_connection_is_closed(gateway):
    with gateway.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _response(sock, 5).startswith(b"HTTP/1.1 200")
        took = _closed_within(sock, 5)
    assert took is not None and took < 3


def test_past_the_connection_cap_a_new_connection_is_closed_at_once(gateway):
    held = [gateway.connect() for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.1)
        with gateway.connect() as extra:
            took = _closed_within(extra, 0.5)
    finally:
        for sock in held:
            sock.close()
    assert took is not None
    with gateway.http() as http:  # the held ones are gone: served again
        assert http.get("/healthz").status_code == 200


# ---------------------------------------------------------------- 2: the body limit


def test_a_body_larger_than_the_limit_is_refused_by_its_content_length(gateway):
    with gateway.connect() as sock:
        sock.sendall(
            b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + OTHER.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 104857600\r\n\r\n"
        )
        answer = _response(sock, 3)  # no byte of the 100 MB was sent
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"request_too_large" in answer


def test_a_streamed_body_is_refused_once_it_passes_the_limit(gateway):
    chunk = b"x" * 16384
    sent, answer = 0, b""
    with gateway.connect() as sock:
        sock.sendall(
            b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + OTHER.encode()
            + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        while sent < 4 << 20:  # a 4 MiB body, 16 KiB a chunk, for as long as the server reads it
            if select.select([sock], [], [], 0.02)[0]:
                answer = _response(sock, 2)
                break
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except (BrokenPipeError, ConnectionResetError):
                answer = _response(sock, 2)
                break
            sent += len(chunk)
    assert answer.startswith(b"HTTP/1.1 413"), (sent, answer[:200])
    assert sent < 1 << 20  # refused while it streamed, not after it was all buffered


def test_deeply_nested_json_is_a_clean_400(gateway):
    with gateway.http(OTHER) as http:
        r = http.post("/v1/jobs", content=b"[" * 50_000, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] is None
    assert "nested" in r.json()["error"]["message"]


# ---------------------------------------------------------------- 11: limits


def test_the_rate_limit_is_a_bucket_not_a_fixed_window(gateway):
    """rpm 30 with a burst of 3: a flood gets 3 at once, then one every 2 s (a fixed window let 30 through)."""
    admitted = 0
    start = time.monotonic()
    with gateway.http(RATED) as http:
        for _ in range(20):
            r = http.post("/v1/jobs", json={"prompt": "a fox"})
            admitted += r.status_code == 202
            if r.status_code == 429:
                assert 1 <= int(r.headers["retry-after"]) <= 2
    elapsed = time.monotonic() - start
    assert 3 <= admitted <= 3 + int(elapsed / 2) + 1


def test_n_above_the_keys_jobs_in_flight_cap_is_a_400(gateway):
    with gateway.http(CAPPED) as http:
        r = http.post("/v1/images/generations", json={"prompt": "a fox", "n": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_job_reads_and_event_streams_are_rate_limited(gateway):
    """read_rpm 60 (a burst of 6): polling a job and opening its event stream count against it."""
    statuses = []
    with gateway.http(READER) as reader:
        job_id = reader.post("/v1/jobs", json={"prompt": "a fox"}).json()["id"]
        for _ in range(8):
            statuses.append(reader.get(f"/v1/jobs/{job_id}").status_code)
        with reader.stream("GET", f"/v1/jobs/{job_id}/events") as events:
            statuses.append(events.status_code)
    assert statuses[:6] == [200] * 6 and statuses[6:] == [429, 429, 429], statuses


def test_page_views_are_rate_limited_per_address(gateway):
    with gateway.http() as http:
        statuses = [http.get("/").status_code for _ in range(100)]
    assert statuses[:50] == [200] * 50 and 429 in statuses


# ---------------------------------------------------------------- 4: one key's streams starve no one


def test_one_keys_open_event_streams_do_not_starve_another_key(gateway):
    """120 event streams held open by one key (more than a Redis connection pool's 100): another key's
    job is still created at once.  With a connection per stream reader it waited 20 s for one."""
    with gateway.http(HOLDER) as holder:
        job_id = holder.post("/v1/jobs", json={"prompt": "a fox"}).json()["id"]  # never served: no router
    request = (f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {HOLDER}\r\n\r\n").encode()
    streams = []
    try:
        for _ in range(120):
            sock = gateway.connect()
            sock.sendall(request)
            streams.append(sock)
        for sock in streams:  # each got its 200 and its first event: the streams are open
            sock.settimeout(10)
            head = b""
            while b"event: queued" not in head:
                head += sock.recv(65536)
        start = time.monotonic()
        with gateway.http(OTHER, timeout=30) as other:
            created = other.post("/v1/jobs", json={"prompt": "a lighthouse"})
            seen = other.get(f"/v1/jobs/{created.json()['id']}")
        took = time.monotonic() - start
    finally:
        for sock in streams:
            sock.close()
    assert created.status_code == 202 and seen.status_code == 200
    assert took < 2
