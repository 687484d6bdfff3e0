"""Gate, egress check, refusal endpoint and start-up check: the relay refuses rather than passes through."""

from __future__ import annotations

import asyncio
import json

import pytest
from mitmproxy import exceptions, optmanager
from mitmproxy.test import taddons, tflow

from addon import gate as gate_module
from addon.egress import EGRESS_KEY, attach
from addon.errors import error_response, fail_closed
from addon.gate import EgressCheck, Gate
from addon.guard.target import target_problem
from addon.refusal import REFUSED_KEY, RefusalSink, answered
from addon.services.runtime import Runtime
from addon.startup import (
    StartupCheck,
    listen_hosts,
    open_relay_problem,
    startup_summary,
    take_unusable_options,
    unknown_options_message,
)
from store.records import NodeConfig
from tests.support.flows import request_flow

NODE = NodeConfig(id="n", base_url="http://127.0.0.1:9/v1", api_key="sk-node-0123456789abcdef")


def flow(path: str = "/v1/responses", mode: str = "reverse:http://127.0.0.1:9", headers: dict | None = None):
    return request_flow(path, headers, mode)  # the relay's own port unless said otherwise


def error_of(f) -> dict:
    assert f.response is not None and f.response.headers["content-type"] == "application/json"
    return json.loads(f.response.content)


def test_requests_wait_for_the_end_of_start_up_then_pass_on():
    """mitmproxy may serve before the script's ``running`` hook: such a request waits, and goes on once
    start-up is over (a relay restarted behind a balancer answers its first calls)."""
    async def scenario() -> None:
        gate = Gate(RefusalSink())
        f, bad = flow(), flow("/v1/./responses")
        held = [asyncio.ensure_future(gate.requestheaders(f)), asyncio.ensure_future(gate.requestheaders(bad))]
        await asyncio.sleep(0)  # let them start waiting
        assert not any(h.done() for h in held) and f.response is None
        gate.settle(True)
        await asyncio.gather(*held)
        assert f.response is None and not answered(f)
        # The checks of a ready gate still run on a held request.
        assert bad.response.status_code == 400 and error_of(bad)["error"]["code"] == "invalid_request_target"
        assert gate.requestheaders(flow()) is None  # ready: nothing to wait for

    asyncio.run(scenario())


def test_requests_held_at_start_up_get_503_when_it_fails_and_later_ones_at_once():
    async def scenario() -> None:
        gate = Gate(RefusalSink())
        f = flow()
        held = asyncio.ensure_future(gate.requestheaders(f))
        await asyncio.sleep(0)
        gate.settle(False)
        await held
        assert f.response.status_code == 503 and error_of(f)["error"]["code"] == "relay_not_ready"
        assert answered(f) and f.metadata[REFUSED_KEY] == 503
        # The Anthropic client of /v1/messages gets Anthropic's shape, without waiting.
        m = flow("/v1/messages")
        assert gate.requestheaders(m) is None
        assert error_of(m) == {"type": "error", "error": {"type": "overloaded_error",
                                                          "message": error_of(m)["error"]["message"]}}

    asyncio.run(scenario())


def test_a_start_up_longer_than_the_hold_gets_503(monkeypatch):
    monkeypatch.setattr(gate_module, "START_HOLD_S", 0.01)

    async def scenario() -> None:
        gate = Gate(RefusalSink())
        f = flow()
        await gate.requestheaders(f)
        assert f.response.status_code == 503 and error_of(f)["error"]["code"] == "relay_not_ready"

    asyncio.run(scenario())


@pytest.mark.parametrize("path", ["@127.0.0.1:1/v1/responses", "/admin#/../v1/responses", "/v1/r\udcc3\udca9sponses",
                                  "//evil/v1/responses", "/v1/./responses", "/v1%2Fresponses"])
def test_non_canonical_targets_get_400_on_the_relays_port(path):
    gate = Gate(RefusalSink())
    gate.settle(True)
    f = flow(path)
    gate.requestheaders(f)
    assert f.response.status_code == 400 and error_of(f)["error"]["code"] == "invalid_request_target"
    # As a forward proxy the Gate leaves other sites' paths alone (the relay checks what it routes).
    g = flow(path, mode="regular")
    gate.requestheaders(g)
    assert g.response is None


@pytest.mark.parametrize("mode", ["reverse:http://127.0.0.1:9", "regular"])
@pytest.mark.parametrize(("name", "value"), [(b"x-a", b"a\rb"), (b"x-a", b"a\x00b"), (b"x\ra", b"b"),
                                             (b"x-a", b"a\nb")])
def test_a_header_with_a_cr_lf_or_nul_is_refused_with_400_before_any_addon_reads_it(mode, name, value):
    gate = Gate(RefusalSink())
    gate.settle(True)
    for path, shape in (("/v1/responses", "openai"), ("/v1/messages", "anthropic")):
        f = flow(path, mode)
        f.request.headers.fields = ((b"authorization", b"Bearer k"), (name, value), (b"x-b", b"fine"))
        gate.requestheaders(f)
        assert f.response.status_code == 400 and f.metadata[REFUSED_KEY] == 400
        error = error_of(f)
        assert (error["error"]["code"] == "invalid_header") if shape == "openai" else (error["type"] == "error")
        assert (name, value) not in f.request.headers.fields  # nor does the refusal endpoint get it
    clean = flow(mode=mode, headers={"x-a": "a b\tc"})
    gate.requestheaders(clean)
    assert clean.response is None


def test_a_request_nobody_cleared_never_leaves():
    check = EgressCheck()
    f = flow(headers={"authorization": "Bearer client-key"})
    check.request(f)
    assert f.response.status_code == 500 and error_of(f)["error"]["code"] == "relay_internal_error"
    assert "authorization" not in f.request.headers
    ok = flow()
    attach(ok, NODE, "/v1/responses")
    check.request(ok)
    assert ok.response is None
    ok.request.port = 1  # moved after it was cleared
    check.request(ok)
    assert ok.response.status_code == 500


def test_an_exception_in_a_hook_answers_500_instead_of_passing_through():
    class Broken:
        @fail_closed
        def request(self, f):
            f.request.url = "http://h/v1/r\udcc3\udca9sponses"  # UnicodeEncodeError, as in the issue

        @fail_closed
        async def requestheaders(self, f):
            raise RuntimeError("bug")

    f = flow("/v1/messages")
    Broken().request(f)
    assert f.response.status_code == 500 and error_of(f)["type"] == "error"
    g = flow()
    asyncio.run(Broken().requestheaders(g))
    assert error_of(g)["error"]["code"] == "relay_internal_error"


def test_refused_body_is_drained_by_the_local_endpoint_not_buffered():
    async def scenario() -> tuple[bytes, tflow.HTTPFlow]:
        sink = RefusalSink()
        sink.load(None)
        try:
            # Before the script's running hooks: mitmproxy already serves clients by then.
            f = flow(headers={"content-length": "1000000", "authorization": "Bearer wrong"})
            from addon.errors import error_response
            sink.refuse(f, error_response("/v1/responses", 401, "no", "invalid_api_key"), "test")
            assert f.response is None and f.request.stream is True  # mitmproxy streams it on, unbuffered
            assert (f.request.host, f.request.port) == ("127.0.0.1", sink.port)
            assert "authorization" not in f.request.headers and f.metadata[EGRESS_KEY][2] == sink.port
            reader, writer = await asyncio.open_connection("127.0.0.1", sink.port)
            sink.running()  # returns at once: mitmproxy's own running hooks come after the script's
            writer.write(f"POST {f.request.path} HTTP/1.1\r\nhost: x\r\ncontent-length: 1000000\r\n\r\n".encode())
            for _ in range(100):
                writer.write(b"x" * 10_000)
            await writer.drain()
            answer = await reader.read()
            writer.close()
            return answer, f
        finally:
            sink.done()

    answer, f = asyncio.run(scenario())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401") and json.loads(body)["error"]["code"] == "invalid_api_key"
    assert f.metadata[REFUSED_KEY] == 401


def test_an_absolute_form_request_gets_its_refusal_from_the_local_endpoint():
    # mitmproxy sends an absolute-form request on in absolute form: the endpoint answered it an empty 404.
    async def scenario() -> bytes:
        sink = RefusalSink()
        sink.load(None)
        try:
            f = flow(headers={"content-length": "2"})
            sink.refuse(f, error_response("/v1/responses", 401, "no", "invalid_api_key"), "test")
            sink.running()
            reader, writer = await asyncio.open_connection("127.0.0.1", sink.port)
            writer.write(f"POST http://127.0.0.1:{sink.port}{f.request.path} HTTP/1.1\r\nhost: x\r\n"
                         "content-length: 2\r\n\r\n{}".encode())
            answer = await reader.read()
            writer.close()
            return answer
        finally:
            sink.done()

    head, _, body = asyncio.run(scenario()).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401") and json.loads(body)["error"]["code"] == "invalid_api_key"


def deferred_options() -> optmanager.OptManager:
    opts = optmanager.OptManager()
    # As mitmdump does: --set values wait until the script's addons declare their options in load.
    opts.set("codex_client_keys=@a", "codex_client_keys=@a", "codex_retries=abc", "codex_source=x",
             "codex_other=1", defer=True)
    opts.add_option("codex_client_keys", str, "", "keys")
    opts.add_option("codex_retries", int, 2, "retries")
    opts.add_option("codex_source", str, "relay", "source")
    return opts


def test_options_given_twice_or_mistyped_are_taken_out_and_named():
    with pytest.raises(exceptions.OptionsError):  # what mitmproxy does next, dropping the whole script
        deferred_options().process_deferred()
    opts = deferred_options()
    problems = take_unusable_options(opts)
    assert problems == ["codex_client_keys is given 2 times: give each option once",
                        "codex_retries: the value given is not a valid int"]
    assert "@a" not in " ".join(problems)
    assert set(opts.deferred) == {"codex_source", "codex_other"}
    opts.process_deferred()  # no longer raises
    assert opts.codex_source == "x"


def test_startup_check_opens_the_gate_only_when_start_up_is_over():
    gate = Gate(RefusalSink())
    check = StartupCheck(gate, Runtime())
    with taddons.context(check) as tctx:
        tctx.options.add_option("codex_client_keys", str, "", "declared by ClientAuth")
        tctx.options.add_option("codex_admin_token", str, "", "declared by Admin")
        tctx.configure(check)
        assert not gate.ready  # configured, but mitmproxy's own addons are not running yet
        check.running()
        assert gate.ready
        tctx.configure(check)  # options changed at run time, taken by every addon
        assert gate.ready


def test_startup_check_keeps_the_gate_closed_when_options_were_refused():
    gate = Gate(RefusalSink())
    check = StartupCheck(gate, Runtime())
    with taddons.context(check) as tctx:
        tctx.options.add_option("codex_client_keys", str, "", "declared by ClientAuth")
        tctx.configure(check)
        check.problems = ["codex_client_keys is given 2 times"]
        tctx.configure(check)

        async def start() -> None:
            check.running()
            assert not gate.ready
            await asyncio.sleep(0)  # the process ends on the loop's next turn

        with pytest.raises(SystemExit):
            asyncio.run(start())
        assert not gate.ready


@pytest.mark.parametrize(("hosts", "keys", "allow", "refused"), [
    ([""], False, False, True), (["0.0.0.0"], False, False, True), (["::"], False, False, True),
    (["127.0.0.1"], False, False, False), (["localhost", "::1"], False, False, False),
    ([""], True, False, False), ([""], False, True, False), (["127.0.0.1", "192.0.2.1"], False, False, True),
])
def test_open_relay_refused(hosts, keys, allow, refused):
    problem = open_relay_problem(routes=True, client_keys=keys, hosts=hosts, allow_open=allow)
    assert (problem is not None) == refused
    if refused:
        assert "codex_allow_open" in problem
    assert open_relay_problem(routes=False, client_keys=False, hosts=[""], allow_open=False) is None


def test_listen_hosts_read_mode_specs():
    assert listen_hosts(["reverse:http://h:1", "regular@0.0.0.0:8080"], "127.0.0.1") == ["127.0.0.1", "0.0.0.0"]




@pytest.mark.parametrize(("target", "dotted"), [
    ("/.", True), ("/..", True), ("/v1/.", True), ("/v1/..", True), ("/./v1", True), ("/v1/../x", True),
    ("/v1/.x", False), ("/v1/..x", False), ("/v1/x.", False), ("/v1/x?y=/../", False), ("/v1/...", False),
])
def test_dot_segments_anywhere_in_the_path_but_not_the_query(target, dotted):
    problem = target_problem(target)
    assert (problem == "the request path must not contain '.' or '..' segments") is dotted, problem


def test_the_gate_sets_the_mitmproxy_options_the_relay_depends_on():
    from mitmproxy.addons.proxyserver import Proxyserver

    gate = Gate(RefusalSink())
    with taddons.context(Proxyserver(), gate) as tctx:
        tctx.options.update(connection_strategy="eager", keep_host_header=False)
        gate.load(None)  # as at the script's start: after mitmproxy's own options were set
        assert tctx.options.connection_strategy == "lazy"
        assert tctx.options.keep_host_header is True


def test_the_start_up_summary_says_where_clients_and_the_admin_page_are():
    line = startup_summary(reverse_addrs=[("127.0.0.1", 8000)] * 2, proxy_addrs=[], database="sqlite:///data/codex.db",
                           nodes=["alpha", "beta"], client_keys=False, admin_token=False)
    assert line == ("codex-relay ready; clients: http://127.0.0.1:8000/v1 (OpenAI base URL; Anthropic clients: "
                    "http://127.0.0.1:8000), admin page: http://127.0.0.1:8000/admin; nodes: alpha, beta; "
                    "client keys: off (anyone who reaches the port may call); database: sqlite:///data/codex.db")
    line = startup_summary(reverse_addrs=[("0.0.0.0", 8001)], proxy_addrs=[("::", 8080)], database=None, nodes=[],
                           client_keys=True, admin_token=True)
    assert "clients: http://127.0.0.1:8001/v1" in line
    assert "admin page: http://127.0.0.1:8001/admin (codex_admin_token)" in line
    assert "proxy clients: http://127.0.0.1:8080" in line and "monitor mode" in line and "client keys: on" in line


@pytest.mark.parametrize(("target", "problem"), [
    ("/v1/respons%65s", "percent-encode letters"), ("/v1/chat/completion%73", "percent-encode letters"),
    ("/v1/messag%65s", "percent-encode letters"), ("/v1/%72esponses", "percent-encode letters"),
    ("/v1/responses%7E", "percent-encode letters"), ("/v1/x%5Fy", "percent-encode letters"),
    ("/v1/Responses", "lower case"), ("/V1/responses", "lower case"), ("/v1/CHAT/completions", "lower case"),
    ("/v1/Messages?beta=true", "lower case"),
    ("/v1/responses", None), ("/v1/files/a%20b", None), ("/v1/files/%E2%82%AC", None), ("/v1/x?q=%65", None),
    ("/v1/responses/resp_ABC", None), ("/v1/models/GPT-5", None),
])
def test_a_path_a_node_could_read_as_an_api_endpoint_is_canonical_or_refused(target, problem):
    """Upstreams that decode %XX (Go net/http, uvicorn) or ignore case serve these as the endpoint itself:
    the relay's checks (keys' models and budgets, the meter) must see the same endpoint."""
    found = target_problem(target)
    assert (found is None) if problem is None else (problem in (found or "")), found


def test_an_unknown_option_names_the_one_it_most_likely_meant():
    known = ["codex_retries", "codex_nodes", "codex_db"]
    assert unknown_options_message({"codex_retrys": "1"}, known) == (
        "unknown option(s): codex_retrys (did you mean codex_retries?); ./run.sh --options (or mitmdump -s "
        "addon/codex.py --options) lists every option with its help")
    assert unknown_options_message({"codex_xyzzy": "1"}, known).startswith("unknown option(s): codex_xyzzy;")
    assert unknown_options_message({}, known) is None


def test_the_health_check_says_starting_ready_and_draining_and_is_never_held():
    draining = False
    gate = Gate(RefusalSink(), lambda: draining)

    def check(mode: str = "reverse:http://127.0.0.1:9") -> tuple[int, dict]:
        f = flow("/healthz?from=haproxy", mode)
        assert gate.requestheaders(f) is None  # answered at once, even while starting
        return f.response.status_code, json.loads(f.response.content)

    assert check() == (503, {"status": "starting"})
    gate.settle(True)
    assert check() == (200, {"status": "ready"})
    draining = True
    assert check() == (503, {"status": "draining"})
    # As a forward proxy /healthz is some other site's path: left alone.
    g = flow("/healthz", "regular")
    gate.requestheaders(g)
    assert g.response is None
