"""The relay's own endpoints (admin page, /metrics, the usage endpoint) read at most 1 MiB of a request body and
buffer no more (issue 25, item 6): the hooks in process, then a real relay fed chunked and HTTP/2 bodies."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator

import pytest
from mitmproxy.test import taddons

from addon.auth import ClientAuth
from addon.egress import EGRESS_KEY
from addon.ownbody import MAX_BODY, OwnBodies
from addon.refusal import REFUSED_KEY, RefusalSink, answered
from addon.serviceoptions import ClientKeyOptions
from addon.services.clientkeys import ClientKeys
from addon.services.runtime import Runtime
from addon.userstats import UserStats
from tests.support.flows import request_flow
from tests.support.h2client import h2_exchange
from tests.support.procstat import PeakRss
from tests.support.relayproc import RelayProcess

MiB = 2**20
USAGE_PATH = "/apiStats/api/user-model-stats"
CLIENT_KEY = "ck-owner-0123456789abcdef"
REVERSE = "reverse:http://127.0.0.1:9"


@pytest.fixture
def chain() -> Iterator[tuple[RefusalSink, ClientAuth, OwnBodies, UserStats]]:
    sink = RefusalSink()
    sink.load(None)  # its port: a refused body is streamed there
    runtime = Runtime()
    keys = ClientKeyOptions(runtime)
    auth = ClientAuth(sink, runtime.keys)
    own, stats = OwnBodies(sink, runtime.keys), UserStats(runtime)
    with taddons.context(keys) as tctx:
        tctx.configure(keys, codex_client_keys=f"owner={CLIENT_KEY}")
        yield sink, auth, own, stats
    sink.done()


def through(own: OwnBodies, stats: UserStats, flow, chunks: list[bytes]) -> None:
    """What mitmproxy does with the flow after ``requestheaders``: the body through its stream callable, if set
    and a body comes, then the request hooks in chain order."""
    if chunks and callable(flow.request.stream):
        for chunk in [*chunks, b""]:
            assert flow.request.stream(chunk) == chunk  # passed on: the refusal endpoint drains it
    own.request(flow)
    asyncio.run(stats.request(flow))
    own.handover.request(flow)


def test_a_declared_length_over_the_cap_is_refused_before_the_body_is_read(chain):
    sink, auth, own, _ = chain
    for path in (USAGE_PATH, "/admin/login", "/admin/api/nodes", "/metrics"):
        f = request_flow(path, {"content-length": str(MAX_BODY + 1)}, REVERSE)
        own.requestheaders(f)
        assert f.metadata[REFUSED_KEY] == 413 and f.request.port == sink.port and f.request.stream is True
        ok = request_flow(path, {"content-length": str(MAX_BODY)}, REVERSE)
        own.requestheaders(ok)
        assert not answered(ok)  # mitmproxy holds at most the cap


def test_a_body_of_unknown_length_within_the_cap_reaches_its_endpoint_as_sent(chain):
    sink, auth, own, stats = chain
    f = request_flow(USAGE_PATH, {"transfer-encoding": "chunked", "host": "relay.example"}, REVERSE)
    f.request.method = "POST"
    sent = f.request.headers.fields
    own.requestheaders(f)
    assert f.request.port == sink.port and callable(f.request.stream)  # streamed, not buffered
    for chunk in (b'{"apiKey": ', b'"ck-nobody-1"}', b""):
        assert f.request.stream(chunk) == chunk  # passed on: the refusal endpoint drains it
    diverted = f.request.headers.fields
    seen = []
    own.request(f)
    seen.append((f.request.path, f.request.headers.fields, f.request.content))
    asyncio.run(stats.request(f))
    own.handover.request(f)
    # The endpoint saw the request as sent; mitmproxy ends it as it went to the refusal endpoint.
    assert seen == [(USAGE_PATH, sent, b'{"apiKey": "ck-nobody-1"}')] and f.request.headers.fields == diverted
    assert REFUSED_KEY not in f.metadata and EGRESS_KEY not in f.metadata
    answer = f.response
    assert answer.status_code == 401 and json.loads(answer.content)["error"] == "Invalid API key"
    # The request went to the refusal endpoint: mitmproxy takes its 413 next, and the client gets the answer.
    f.response = answer.make(413, b"refusal endpoint")
    own.response(f)
    assert f.response is answer


def test_a_body_over_the_cap_is_dropped_as_it_streams_and_refused(chain):
    sink, auth, own, stats = chain
    f = request_flow("/admin/api/nodes", {"transfer-encoding": "chunked"}, REVERSE)
    f.request.method = "POST"
    own.requestheaders(f)
    body = f.request.stream
    through(own, stats, f, [bytes(MiB // 2)] * 3)
    assert body.over and not body.kept  # nothing of it held
    assert f.response is None and f.metadata[REFUSED_KEY] == 413 and f.request.port == sink.port


def test_a_request_that_brings_no_body_after_all_is_answered_directly(chain):
    sink, auth, own, stats = chain
    f = request_flow(USAGE_PATH, mode=REVERSE)
    f.request.http_version = "HTTP/2.0"  # no length: a body may follow, or none (an HTTP/2 GET)
    f.request.method = "POST"
    own.requestheaders(f)
    token = f.request.path.lstrip("/")
    through(own, stats, f, [])
    assert f.request.path == USAGE_PATH and f.response.status_code == 400  # no apiKey: CRS's answer
    assert token not in sink._answers  # nothing left waiting at the refusal endpoint


@pytest.mark.parametrize(("path", "mode", "keys"), [
    ("/v1/responses", REVERSE, True),  # a call: codex_max_request_body applies
    ("/admin/api/nodes", "regular", True),  # another site's path
    (USAGE_PATH, REVERSE, False),  # without client keys the relay routes the usage path like any call
])
def test_other_requests_are_left_alone(chain, path, mode, keys):
    sink, auth, own, _ = chain
    if not keys:
        own = OwnBodies(sink, ClientKeys())
    f = request_flow(path, {"transfer-encoding": "chunked"}, mode)
    own.requestheaders(f)
    assert not answered(f) and f.request.path == path and not f.request.stream


# -- a real relay ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def relay(tmp_path_factory) -> Iterator[RelayProcess]:
    tmp = tmp_path_factory.mktemp("ownbody")
    options = {"codex_upstream": "http://127.0.0.1:9/v1", "codex_upstream_key": "sk-node-0123456789",
               "codex_client_keys": f"owner={CLIENT_KEY}", "codex_ping_interval": "0"}
    with RelayProcess(db_url=f"sqlite:///{tmp / 'codex.db'}", options=options) as r:
        yield r


def h1(port: int, head: bytes, body: bytes = b"", *, chunks: int = 0) -> tuple[int, bytes]:
    """A raw HTTP/1.1 request (``chunks`` chunks of 1 MiB after ``body``); the status and body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(head + body)
        block = b"%x\r\n%s\r\n" % (MiB, bytes(MiB))
        for _ in range(chunks):
            s.sendall(block)
        if chunks:
            s.sendall(b"0\r\n\r\n")
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.partition(b"\r\n\r\n")[2]) < _length(reply):
            if not (data := s.recv(65536)):
                break
            reply += data
    head_out, _, rest = reply.partition(b"\r\n\r\n")
    return int(head_out.split(b" ", 2)[1]), rest


def _length(reply: bytes) -> int:
    for line in reply.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def h2_request(port: int, method: str, path: str, body: bytes = b"", *, mib: int = 0) -> tuple[int, bytes]:
    """One request over TLS + HTTP/2 without a content-length: ``body``, then ``mib`` MiB of zeros."""
    headers = [(":method", method), (":scheme", "https"), (":authority", f"127.0.0.1:{port}"), (":path", path),
               ("content-type", "application/json")]
    return h2_exchange(port, headers, [body, *[bytes(16384)] * (mib * 64)])


@pytest.mark.e2e
def test_a_real_relay_refuses_large_bodies_to_its_own_endpoints_without_holding_them(relay):
    port = relay.port
    chunked = (b"POST %s HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
               b"transfer-encoding: chunked\r\n\r\n")
    with PeakRss([relay.proc.pid], interval=0.005) as mem:
        answers = [h1(port, chunked % USAGE_PATH.encode(), chunks=48), h2_request(port, "POST", "/admin/api/nodes",
                                                                                  mib=48)]
    assert mem.growth_mib < 24, f"the relay's RSS grew by {mem.growth_mib:.0f} MiB for two bodies of 48 MiB"
    for status, body in answers:
        assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    status, _ = h1(port, b"POST /admin/login HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: %d\r\n\r\n" % (2 * MiB),
                   bytes(2 * MiB))
    assert status == 413


@pytest.mark.e2e
def test_a_real_relay_answers_small_bodies_of_unknown_length_as_usual(relay):
    port = relay.port
    key = json.dumps({"apiKey": "ck-nobody-123456"}).encode()
    head = b"POST %s HTTP/1.1\r\nhost: 127.0.0.1\r\ntransfer-encoding: chunked\r\n\r\n" % USAGE_PATH.encode()
    for status, body in (h1(port, head, b"%x\r\n%s\r\n0\r\n\r\n" % (len(key), key)),
                         h2_request(port, "POST", USAGE_PATH, key)):
        assert (status, json.loads(body)) == (401, {"error": "Invalid API key", "message": "API key not found"})
    status, body = h2_request(port, "GET", "/metrics")  # no body at all: answered directly
    assert status == 200 and b"codex_calls_in_flight" in body


@pytest.mark.e2e
def test_a_real_relay_answers_malformed_requests_in_json(relay):
    port = relay.port
    # Without a key: before, an absolute-form request got an empty 404, a bare CR a 502 (issue 25, item 7).
    status, body = h1(port, b"POST http://127.0.0.1:%d/v1/responses HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n"
                      b"{}" % port)
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    for bad in (b"a\rb", b"a\x00b"):
        status, body = h1(port, b"POST /v1/responses HTTP/1.1\r\nhost: x\r\nx-a: %s\r\ncontent-length: 2\r\n\r\n{}"
                          % bad)
        assert status == 400 and json.loads(body)["error"]["code"] == "invalid_header"
