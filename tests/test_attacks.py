"""Issue 10's attacks, replayed against the real relay: a node's key goes to its node and nowhere else,
and the relay never fails open.

Each test replays one attack as an attacker would (raw HTTP/1 sockets, HTTP/2 over TLS with the ``h2``
library mitmproxy ships) against ``mitmdump -s addon/codex.py`` and fake upstreams, all on 127.0.0.1.
The attacks that can share a configuration share one relay (``shared``, ``failover``); the others
start their own. Item numbers are the issue's.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import http.client
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from mitmproxy import io

from tests.support.calls import HEAVY, write_nodes
from tests.support.ci import unavailable
from tests.support.databases import rows
from tests.support.fakeupstream import Behaviour, FakeUpstream
from tests.support.h2client import h2_exchange
from tests.support.ports import free_port
from tests.support.procstat import PeakRss
from tests.support.relayproc import ROOT, RelayProcess
from tests.support.waiting import wait_for

# one xdist worker takes the module, so its relays start once
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("attacks")]

# Distinctive keys: finding "ATTACKCANARY" anywhere is a leak.
NODE_KEY = "sk-node-ATTACKCANARY-a1b2c3d4e5f6a7b8c9d0"
VICTIM_KEY = "sk-victim-ATTACKCANARY-0f1e2d3c4b5a6978"
CLIENT_KEY = "ck-client-ATTACKCANARY-5a6b7c8d9e0f1a2b"
MiB = 1024 * 1024
QUIET = {"codex_ping_interval": "0", "codex_fail_threshold": "0"}  # no pings; nodes never leave rotation


# -- tools -------------------------------------------------------------------------------------------
class Recorder:
    """A plain TCP listener on 127.0.0.1: records what each connection sends (up to the end of its
    headers), then answers 418. A reply that reached the client therefore proves the recording."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.received: list[bytes] = []
        self._thread = threading.Thread(target=self._accept, name="recorder", daemon=True)

    def __enter__(self) -> Recorder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._listener.close()
        self._thread.join(5)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        data = b""
        with conn:
            conn.settimeout(5)
            with contextlib.suppress(OSError):
                while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
                    data += chunk
            self.received.append(data)
            with contextlib.suppress(OSError):
                conn.sendall(b"HTTP/1.1 418 recorder\r\ncontent-length: 8\r\nconnection: close\r\n\r\nrecorder")


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


def exchange(port: int, head: bytes, body: bytes = b"", *, filler: int = 0) -> Reply:
    """Send a raw HTTP/1 request (``head``, ``body``, then ``filler`` zero bytes) and read the reply
    while still sending, as a client does that gets its answer before its upload is done."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(head + body)

        def upload() -> None:
            chunk = bytes(MiB)
            with contextlib.suppress(OSError):  # the relay may answer and close before the end
                for left in range(filler, 0, -MiB):
                    s.sendall(chunk[:left])

        sender = threading.Thread(target=upload, daemon=True)
        sender.start()
        try:
            resp = http.client.HTTPResponse(s)
            resp.begin()
            return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)  # ends an upload the relay no longer reads
            sender.join(30)


def request_head(method: str, target: bytes, port: int, headers: dict[str, str], length: int) -> bytes:
    lines = [b"%s %s HTTP/1.1" % (method.encode(), target), b"host: 127.0.0.1:%d" % port]
    lines += [f"{k}: {v}".encode() for k, v in headers.items()]
    lines.append(b"content-length: %d" % length)
    return b"\r\n".join(lines) + b"\r\n\r\n"


def post(port: int, target: bytes, obj: dict, headers: dict[str, str] | None = None) -> Reply:
    body = json.dumps(obj).encode()
    hdrs = {"content-type": "application/json", **(headers or {})}
    return exchange(port, request_head("POST", target, port, hdrs, len(body)), body)


def call_body(model: str) -> dict:
    return {"model": model, "stream": False, "input": "hi"}


def bearer(key: str = CLIENT_KEY) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def h2_post(port: int, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
    """One POST over TLS + HTTP/2, ``:path`` sent exactly as given (no client-side checks)."""
    return h2_exchange(port, [(":method", "POST"), (":scheme", "https"), (":authority", f"127.0.0.1:{port}"),
                              (":path", path), *headers.items(), ("content-length", str(len(body)))], [body])


def openai_error(status: int, body: bytes, expected_status: int, code: str) -> dict:
    """The relay's own error in the OpenAI shape, with the expected status and code."""
    assert status == expected_status, f"HTTP {status}, expected {expected_status}: {body[:300]!r}"
    error = json.loads(body)["error"]
    assert {"message", "type", "code", "param"} <= set(error) and error["code"] == code, error
    return error


def anthropic_error(status: int, body: bytes, expected_status: int) -> None:
    assert status == expected_status, f"HTTP {status}, expected {expected_status}: {body[:300]!r}"
    doc = json.loads(body)
    assert doc["type"] == "error" and isinstance(doc["error"]["type"], str), doc
    assert isinstance(doc["error"]["message"], str), doc


def exit_without_serving(relay: RelayProcess) -> int:
    """Start a relay that must refuse to run: its exit code. It may exit before it listens, or listen
    briefly (mitmproxy's start-up check runs then) and answer only 503 ``relay_not_ready`` meanwhile."""
    try:
        rc = relay.launch()
        if rc is None:
            with contextlib.suppress(OSError):  # already on its way out
                reply = post(relay.port, b"/v1/responses", call_body("probe"), bearer())
                assert reply.status == 503, f"the relay serves: HTTP {reply.status} {reply.body[:100]!r}"
                openai_error(reply.status, reply.body, 503, "relay_not_ready")
            rc = relay.proc.wait(30)
    finally:
        relay.stop()
    return rc


def invocations(db_url: str, model: str) -> list:
    return rows(db_url, "SELECT * FROM codex_invocations WHERE model = :m", m=model)


def since(up: FakeUpstream, mark: int) -> list[str]:
    """The paths a fake node received after ``mark = len(up.seen)``."""
    return [r.path for r in up.seen[mark:]]


def admin_get(port: int, path: str, host: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers={"host": host})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# -- the relays --------------------------------------------------------------------------------------
@dataclass
class Shared:
    relay: RelayProcess
    node: FakeUpstream  # node "a": base_url without a path; "victim" (weight 0) points at it too
    target: Recorder  # the relay's reverse target: what a passed-through request would reach
    db_url: str


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Iterator[Shared]:
    """Reverse mode with client keys, one routed node whose base_url has no path, SQLite."""
    tmp = tmp_path_factory.mktemp("attacks")
    keys = tmp / "client-keys"
    keys.write_text(f"tester={CLIENT_KEY}\n")
    with FakeUpstream("a") as node, Recorder() as target:
        origin = f"http://127.0.0.1:{node.port}"
        nodes = write_nodes(tmp / "nodes.toml", [("a", origin, NODE_KEY, 1), ("victim", f"{origin}/v1", VICTIM_KEY, 0)])
        db_url = f"sqlite:///{tmp / 'codex.db'}"
        options = {"codex_nodes": str(nodes), "codex_client_keys": f"@{keys}", **QUIET}
        with RelayProcess(db_url=db_url, options=options, reverse_target=f"http://127.0.0.1:{target.port}") as relay:
            yield Shared(relay, node, target, db_url)


@dataclass
class Failover:
    relay: RelayProcess
    a: FakeUpstream  # http://…/openai/v1, answers 500, nearly all the weight
    b: FakeUpstream  # http://…/v1, healthy


@pytest.fixture(scope="module")
def failover(tmp_path_factory) -> Iterator[Failover]:
    tmp = tmp_path_factory.mktemp("failover")
    with FakeUpstream("a", behaviour=Behaviour(status=500)) as a, FakeUpstream("b") as b:
        nodes = write_nodes(tmp / "nodes.toml", [("a", f"http://127.0.0.1:{a.port}/openai/v1", "ka", HEAVY),
                                                 ("b", b.base_url, "kb", 1)])
        options = {"codex_nodes": str(nodes), **QUIET}
        with RelayProcess(db_url=f"sqlite:///{tmp / 'codex.db'}", options=options) as relay:
            yield Failover(relay, a, b)


# -- the attacks ---------------------------------------------------------------------------------------
def test_1_h2_path_cannot_move_a_node_key_to_another_host(shared):
    port, mark = shared.relay.port, len(shared.node.seen)
    body = json.dumps(call_body("attack1")).encode()
    headers = {"content-type": "application/json", **bearer()}
    with Recorder() as q:
        status, answer = h2_post(port, f"@127.0.0.1:{q.port}/v1/responses", headers, body)
        assert not q.received, f"port Q got a connection from the relay: {q.received[-1][:300]!r}"
    assert not since(shared.node, mark), since(shared.node, mark)
    openai_error(status, answer, 400, "invalid_request_target")
    # The same connection type with a canonical path does reach the node.
    status, answer = h2_post(port, "/v1/responses", headers, body)
    assert status == 200, answer[:300]
    assert since(shared.node, mark) == ["/responses"]


def test_2_fragment_does_not_skip_client_keys(shared):
    port, mark = shared.relay.port, len(shared.node.seen)
    reply = post(port, b"/admin#/../v1/responses", call_body("attack2"))
    assert not since(shared.node, mark), f"forwarded to the node with its key: {since(shared.node, mark)}"
    openai_error(reply.status, reply.body, 400, "invalid_request_target")
    # Whatever the relay records is written by now once a later call's row is there.
    assert post(port, b"/v1/responses", call_body("attack2-sync"), bearer()).status == 200
    wait_for(lambda: invocations(shared.db_url, "attack2-sync"), 30, "the later call's row")
    assert not invocations(shared.db_url, "attack2")


def test_3_non_ascii_target_is_refused_not_passed_through(shared):
    port, mark = shared.relay.port, len(shared.node.seen)
    reply = post(port, b"/v1/r\xc3\xa9sponses", call_body("attack3"), bearer())
    assert not shared.target.received, f"passed through to the reverse target: {shared.target.received[-1][:300]!r}"
    assert not since(shared.node, mark), since(shared.node, mark)
    openai_error(reply.status, reply.body, 400, "invalid_request_target")


def test_4_option_given_twice_stops_the_relay(tmp_path):
    keys = tmp_path / "k"
    keys.write_text(f"dup={CLIENT_KEY}\n")
    twice = ["--set", f"codex_client_keys=@{keys}", "--set", f"codex_client_keys=@{keys}"]
    with Recorder() as target:  # a bare reverse proxy would pass the call to it
        relay = RelayProcess(db_url=f"sqlite:///{tmp_path / 'codex.db'}", options=QUIET, extra_args=twice,
                             reverse_target=f"http://127.0.0.1:{target.port}")
        assert exit_without_serving(relay) != 0
    out = relay.output().splitlines()
    assert sum("codex_client_keys" in line for line in out) == 1, out
    assert CLIENT_KEY not in relay.output()


@pytest.mark.parametrize("failure", ["500", "refused"])
def test_5_failover_joins_the_clients_own_path(failover, failure):
    mark = len(failover.b.seen)
    with failover.a.refusing() if failure == "refused" else contextlib.nullcontext():
        reply = post(failover.relay.port, b"/v1/responses", call_body("attack5"))
    assert reply.status == 200, reply.body[:300]
    assert since(failover.b, mark) == ["/v1/responses"]


def test_6a_unauthenticated_huge_body_is_refused_before_it_is_read(shared):
    port, mark = shared.relay.port, len(shared.node.seen)
    size = 256 * MiB
    head = request_head("POST", b"/v1/responses", port, {"content-type": "application/json"}, size)
    with PeakRss([shared.relay.proc.pid], interval=0.005) as mem:
        reply = exchange(port, head, filler=size)
    openai_error(reply.status, reply.body, 401, "invalid_api_key")
    assert not since(shared.node, mark)
    assert mem.growth_mib < 64, f"the relay's RSS grew by {mem.growth_mib:.0f} MiB for a refused body"


def test_6b_body_over_the_limit_gets_413(tmp_path):
    with FakeUpstream("n") as node:
        nodes = write_nodes(tmp_path / "nodes.toml", [("n", node.base_url, NODE_KEY, 1)])
        options = {"codex_nodes": str(nodes), "codex_client_keys": f"t={CLIENT_KEY}",
                   "codex_max_request_body": str(MiB), **QUIET}
        with RelayProcess(db_url=f"sqlite:///{tmp_path / 'codex.db'}", options=options) as relay:
            for path, auth in ((b"/v1/responses", bearer()), (b"/v1/messages", {"x-api-key": CLIENT_KEY})):
                hdrs = {"content-type": "application/json", **auth}
                try:
                    reply = exchange(relay.port, request_head("POST", path, relay.port, hdrs, 2 * MiB),
                                     filler=2 * MiB)
                except OSError as e:  # e.g. the relay exits on an option it does not know
                    relay.stop()
                    pytest.fail(f"{e!r}; the relay said:\n{relay.output()[-1000:]}")
                if path == b"/v1/messages":
                    anthropic_error(reply.status, reply.body, 413)
                else:
                    openai_error(reply.status, reply.body, 413, "request_too_large")
    assert not node.seen


def test_6c_large_error_body_is_streamed_through_not_held(failover):
    size = 96 * MiB  # held whole it would take more than the 64 MiB allowed
    mark = len(failover.b.seen)
    failover.a.behaviour = Behaviour(status=500, error_body=b"x" * size)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", failover.relay.port, timeout=60)
        with PeakRss([failover.relay.proc.pid], interval=0.005) as mem:
            conn.request("POST", "/v1/responses", json.dumps(call_body("attack6c")),
                         {"content-type": "application/json"})
            resp = conn.getresponse()
            received = 0
            while chunk := resp.read(MiB):
                received += len(chunk)
        conn.close()
    finally:
        failover.a.behaviour = Behaviour(status=500)
    assert resp.status == 500, f"HTTP {resp.status}: the large error was held back and retried"
    assert received == size
    assert not since(failover.b, mark)
    assert mem.growth_mib < 64, f"the relay's RSS grew by {mem.growth_mib:.0f} MiB for a streamed error"


def test_7_regular_mode_connect_needs_a_client_key(tmp_path):
    options = {"codex_client_keys": f"t={CLIENT_KEY}", **QUIET}
    with Recorder() as dest, RelayProcess(db_url=f"sqlite:///{tmp_path / 'codex.db'}", options=options,
                                          mode="regular") as relay:
        connect = f"CONNECT 127.0.0.1:{dest.port} HTTP/1.1\r\nhost: 127.0.0.1:{dest.port}\r\n".encode()
        with socket.create_connection(("127.0.0.1", relay.port), timeout=30) as s:
            s.sendall(connect + b"\r\n")
            resp = http.client.HTTPResponse(s, method="CONNECT")
            resp.begin()
            body = resp.read() if resp.status != 200 else b""  # a tunnel's 200 has no body
            # Bytes of some other protocol for the tunnel (HTTP would meet the client-key check inside
            # it): the relay has handled them once an answer or the connection's end is back.
            with contextlib.suppress(OSError):  # a refused client may have been disconnected
                s.sendall(b"SSH-2.0-attacker\r\n\r\n")
                s.recv(65536)
        openai_error(resp.status, body, 407, "proxy_auth_required")
        assert resp.getheader("proxy-authenticate")
        assert not dest.received, f"the tunnel reached the listener: {dest.received}"
        token = base64.b64encode(f"anyone:{CLIENT_KEY}".encode()).decode()
        with socket.create_connection(("127.0.0.1", relay.port), timeout=30) as s:
            s.sendall(connect + f"proxy-authorization: Basic {token}\r\n\r\n".encode())
            resp = http.client.HTTPResponse(s, method="CONNECT")
            resp.begin()
            assert resp.status == 200


def test_8_open_relay_refuses_to_start_and_run_sh_listens_on_loopback(tmp_path):
    with Recorder() as node:
        options = {"codex_upstream": f"http://127.0.0.1:{node.port}/v1", **QUIET}
        exposed = RelayProcess(db_url=f"sqlite:///{tmp_path / 'a.db'}", options=options,
                               extra_args=["--listen-host", "0.0.0.0"])
        assert exit_without_serving(exposed) != 0
    assert any("codex_allow_open" in line for line in exposed.lines), exposed.output()

    allowed = RelayProcess(db_url=f"sqlite:///{tmp_path / 'b.db'}", options={**options, "codex_allow_open": "true"},
                           extra_args=["--listen-host", "0.0.0.0"])
    with allowed:
        assert allowed.listen_host in ("*", "0.0.0.0")

    if not (ROOT / ".venv" / "bin" / "mitmdump").exists():  # ./run.sh would install it first
        unavailable("the run.sh test", "./run.sh needs its .venv (./run.sh setup)")
    # Run from another folder with relative paths: they are read from there, as a user means them.
    (tmp_path / "my-nodes.toml").write_text('[[nodes]]\nid = "mine"\nbase_url = "http://127.0.0.1:9/v1"\n'
                                            'api_key = "sk-mine"\n')
    run_sh = RelayProcess(db_url=None, cwd=tmp_path, argv=[str(ROOT / "run.sh"), "-p", "0",
                                                           "--set", "codex_db=sqlite:///x.db",
                                                           "--set", "codex_nodes=my-nodes.toml"])
    with run_sh:
        assert run_sh.listen_host == "127.0.0.1", run_sh.output()
        summary = wait_for(lambda: [ln for ln in run_sh.lines if "codex-relay ready;" in ln], 30, "the summary")
        assert "nodes: mine;" in summary[0]
    assert (tmp_path / "x.db").exists()


def test_9_admin_keeps_keys_on_their_origin_and_checks_host(shared):
    port = shared.relay.port
    stored = rows(shared.db_url, "SELECT base_url FROM nodes WHERE id = 'victim'")[0].base_url
    elsewhere = f"http://127.0.0.1:{free_port()}/v1"
    # A file node's URL is the file's: the page cannot move it at all.
    reply = post(port, b"/admin/api/nodes", {"id": "victim", "base_url": elsewhere, "api_key": ""})
    assert reply.status == 409, f"HTTP {reply.status}: the page moved a node the nodes file places"
    # A node added on the page (weight 0: no calls) may move, but its key only with a new one.
    added = {"id": "paged", "base_url": stored, "api_key": VICTIM_KEY, "weight": 0}
    assert post(port, b"/admin/api/nodes", added).status == 200
    reply = post(port, b"/admin/api/nodes", {"id": "paged", "base_url": elsewhere, "api_key": ""})
    assert reply.status == 400, f"HTTP {reply.status}: the stored key followed the node to another origin"
    assert [r.base_url for r in rows(shared.db_url, "SELECT base_url FROM nodes WHERE id IN ('victim', 'paged')")] \
        == [stored, stored]
    reply = post(port, b"/admin/api/nodes", {"id": "paged", "base_url": elsewhere, "api_key": "sk-new-key-for-the-new"})
    assert reply.status == 200, reply.body[:300]
    reply = exchange(port, request_head("DELETE", b"/admin/api/nodes/paged", port, {}, 0), b"")
    assert reply.status == 200, reply.body[:300]

    status, body = admin_get(port, "/admin/api/nodes", f"evil.example:{port}")
    assert status == 403, f"HTTP {status}: a DNS-rebinding page reads the admin API"
    status, body = admin_get(port, "/admin/api/nodes", f"127.0.0.1:{port}")
    assert status == 200, body[:300]


def test_10_echoed_keys_are_not_stored_logged_or_shown(shared):
    echo = {"error": {"message": f"Incorrect API key provided: {NODE_KEY}. You sent {CLIENT_KEY}.",
                      "type": "invalid_request_error", "code": "invalid_api_key", "param": None}}
    shared.node.behaviour = Behaviour(status=401, error_body=json.dumps(echo).encode())
    try:
        reply = post(shared.relay.port, b"/v1/responses", call_body("attack10"), bearer())
    finally:
        shared.node.behaviour = Behaviour()
    assert reply.status == 401, reply.body[:300]
    # The client learns that the node refused, not the node's key.
    assert NODE_KEY.encode() not in reply.body and CLIENT_KEY.encode() not in reply.body
    assert b"Incorrect API key provided" in reply.body
    (row,) = wait_for(lambda: invocations(shared.db_url, "attack10"), 30, "the call's row")
    last_error = rows(shared.db_url, "SELECT last_error FROM nodes WHERE id = 'a'")[0].last_error
    status, recent = admin_get(shared.relay.port, "/admin/api/recent?limit=500", f"127.0.0.1:{shared.relay.port}")
    assert status == 200 and b"attack10" in recent
    places = {"codex_invocations.error_message": row.error_message or "", "nodes.last_error": last_error or "",
              "/admin/api/recent": recent.decode(), "the relay's output": shared.relay.output()}
    for where, text in places.items():
        for key in (NODE_KEY, CLIENT_KEY):
            assert key not in text, f"{key} in {where}"


def test_11_flow_waiting_for_headers_survives_sigterm_with_w(tmp_path):
    flows = tmp_path / "flows.mitm"
    db_url = f"sqlite:///{tmp_path / 'codex.db'}"
    with FakeUpstream("slow", behaviour=Behaviour(first_byte_delay=120)) as up:
        nodes = write_nodes(tmp_path / "nodes.toml", [("slow", up.base_url, NODE_KEY, 1)])
        # No drain (tests/test_drain.py has it): the shutdown with the call still waiting is under test.
        relay = RelayProcess(db_url=db_url, options={"codex_nodes": str(nodes), "codex_drain_timeout": "0", **QUIET},
                             extra_args=["-w", str(flows)]).start()

        def waiting_call() -> None:
            with contextlib.suppress(OSError, http.client.HTTPException):  # cut off by the shutdown
                post(relay.port, b"/v1/responses", call_body("attack11"))

        client = threading.Thread(target=waiting_call, daemon=True)
        try:
            client.start()
            wait_for(lambda: up.requests_to("/responses"), 30, "the call to reach the node")
            rc = relay.stop()
        finally:
            relay.kill()
        client.join(30)
    assert rc == 0, relay.output()[-2000:]
    unpicklable = [line.strip() for line in relay.lines if "cannot pickle" in line]
    assert not unpicklable, unpicklable
    with flows.open("rb") as f:
        saved = [flow for flow in io.FlowReader(f).stream() if flow.type == "http"]
    assert any(flow.request.path.endswith("/responses") for flow in saved), "the waiting flow is not in the -w file"
    assert invocations(db_url, "attack11"), "no invocation row for the waiting call"


def test_12_a_call_is_read_as_its_node_reads_it_or_reaches_no_node(shared):
    """Path variants an upstream decodes (%XX, case) and bodies it reads otherwise than the relay (a second
    "model", a model no filter can match) are refused before any node; a gzip body is read decoded."""
    port, mark = shared.relay.port, len(shared.node.seen)
    for target in (b"/v1/respons%65s", b"/v1/Responses", b"/v1/chat/completion%73", b"/v1/messag%65s"):
        reply = post(port, target, call_body("attack12-path"), bearer())
        assert reply.status == 400, (target, reply.status, reply.body[:200])
    duplicate = b'{"model": "o3", "input": "x", "model": "attack12-dup"}'
    surrogate = b'{"model": "attack12\\ud800", "input": "x"}'
    for body in (duplicate, surrogate, b"not json"):
        reply = exchange(port, request_head("POST", b"/v1/responses", port,
                                            {"content-type": "application/json", **bearer()}, len(body)), body)
        openai_error(reply.status, reply.body, 400, "invalid_request_body")
    assert since(shared.node, mark) == []
    body = gzip.compress(json.dumps(call_body("attack12-gzip")).encode())
    reply = exchange(port, request_head("POST", b"/v1/responses", port, {
        "content-type": "application/json", "content-encoding": "gzip", **bearer()}, len(body)), body)
    assert reply.status == 200, reply.body[:300]
    assert since(shared.node, mark) == ["/responses"]
    wait_for(lambda: invocations(shared.db_url, "attack12-gzip"), 30, "the gzip call's row with its model")
