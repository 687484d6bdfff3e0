"""Responses over WebSocket end to end: the openai SDK's ``client.responses.connect()`` through a real relay to a
node that speaks it; each turn a row with the node's usage, a key's daily_requests per turn, 426 without a node;
the saved socket (what mitmweb shows) without the node's key."""

from __future__ import annotations

import datetime as dt
import ssl

import openai
import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from mitmproxy import io
from websockets.exceptions import InvalidStatus

from tests.support.connectproxy import ConnectProxy
from tests.support.fakeupstream import FakeUpstream
from tests.support.relayproc import RelayProcess
from tests.support.wsupstream import WsUpstream

pytestmark = pytest.mark.e2e

ALICE, BOB = "ck-alice-0123456789", "ck-bob-0123456789"


def turn(conn, usage: tuple[int, int, int, int]) -> list:
    conn.response.create(model="gpt-5-codex", input="hi", metadata={"fake_usage": list(usage)})
    events = []
    for event in conn:
        events.append(event)
        if event.type in ("response.completed", "error"):
            return events
    raise AssertionError("the socket closed before the turn ended")


def test_sdk_turns_on_one_socket_are_rows_limited_per_turn_and_no_websocket_node_is_426(db_url, tmp_path):
    ws, plain = WsUpstream().start(), FakeUpstream("plain").start()
    try:
        nodes = tmp_path / "nodes.toml"
        nodes.write_text(f'[[nodes]]\nid = "ws"\nbase_url = "{ws.base_url}"\napi_key = "node-key-ws"\n\n'
                         f'[[nodes]]\nid = "plain"\nbase_url = "{plain.base_url}"\napi_key = "node-key-plain"\n'
                         "websocket = false\n")
        keys = tmp_path / "keys.toml"
        keys.write_text(f'[[keys]]\nname = "alice"\nkey = "{ALICE}"\nnodes = ["ws"]\ndaily_requests = 2\n\n'
                        f'[[keys]]\nname = "bob"\nkey = "{BOB}"\nnodes = ["plain"]\n')
        options = {"codex_nodes": str(nodes), "codex_client_keys": f"@{keys}", "codex_ping_interval": "0"}
        with RelayProcess(db_url=db_url, options=options) as relay:
            client = openai.OpenAI(base_url=f"{relay.url}/v1", api_key=ALICE, max_retries=0)
            with client.responses.connect(max_retries=0) as conn:
                first = turn(conn, (207, 100, 47, 12))
                second = turn(conn, (310, 0, 20, 0))
                third = turn(conn, (999, 0, 999, 0))
            bob = openai.OpenAI(base_url=f"{relay.url}/v1", api_key=BOB, max_retries=0)
            with pytest.raises(InvalidStatus) as refused, bob.responses.connect(max_retries=0):
                pass
        assert relay.proc is not None and relay.proc.returncode == 0, relay.output()
        assert "Traceback" not in relay.output() and "Error" not in relay.output(), relay.output()
    finally:
        ws.stop()
        plain.stop()
    assert [e.type for e in first] == ["response.created", "response.output_item.added", "response.content_part.added",
                                       "response.output_text.delta", "response.output_text.done",
                                       "response.content_part.done", "response.output_item.done",
                                       "response.completed"]
    assert second[-1].type == "response.completed"
    assert [e.type for e in third] == ["error"] and third[0].error.code == "budget_exceeded"
    assert refused.value.response.status_code == 426
    # The node saw two turns on one socket, with its own key; the refused turn never reached it. The relay asked it
    # once before (a node not yet seen taking an upgrade: addon.wsrelay's takes_upgrade): two upgrades.
    assert len(ws.creates) == 2 and len(ws.headers) == 2
    assert {h["authorization"] for h in ws.headers} == {"Bearer node-key-ws"}
    assert plain.seen == []

    eng = sa.create_engine(db_url)
    try:
        with eng.connect() as c:
            rows = c.execute(sa.text(
                "SELECT client_key, node_id, model, status, input_tokens, cache_input_tokens, output_tokens, "
                "reasoning_tokens, total_tokens, ttfb_ms, duration_ms FROM codex_invocations ORDER BY id")).all()
    finally:
        eng.dispose()
    assert [tuple(r[:9]) for r in rows] == [
        ("alice", "ws", "gpt-5-codex", "success", 207, 100, 47, 12, 254),
        ("alice", "ws", "gpt-5-codex", "success", 310, 0, 20, 0, 330),
    ]
    assert all(r.ttfb_ms is not None and r.duration_ms >= r.ttfb_ms for r in rows)


def test_the_saved_socket_shows_no_node_key_in_its_upgrade_nor_its_messages(sqlite_url, tmp_path):
    """What mitmweb shows of a socket, as ``-w`` saves the same flow objects: the upgrade's request headers carry
    the node's key masked (addon.hygiene), and a node's error event that echoes its key reaches neither the client
    nor the flow with it."""
    ws = WsUpstream().start()
    node_key = "sk-node-key-0123456789abcdef"
    flows = tmp_path / "flows"
    try:
        nodes = tmp_path / "nodes.toml"
        nodes.write_text(f'[[nodes]]\nid = "ws"\nbase_url = "{ws.base_url}"\napi_key = "{node_key}"\n')
        with RelayProcess(db_url=sqlite_url, options={"codex_nodes": str(nodes), "codex_ping_interval": "0"},
                          extra_args=["-w", str(flows)]) as relay:
            client = openai.OpenAI(base_url=f"{relay.url}/v1", api_key="client-key", max_retries=0)
            with client.responses.connect(max_retries=0) as conn:
                ok = turn(conn, (10, 0, 1, 0))
                conn.response.create(model="gpt-5-codex", input="hi", metadata={"fake_error": "echo_key"})
                echoed = next(iter(conn))
        assert relay.proc is not None and relay.proc.returncode == 0, relay.output()
    finally:
        ws.stop()
    assert ok[-1].type == "response.completed"
    assert ws.headers[-1]["authorization"] == f"Bearer {node_key}"  # the node got its key
    assert echoed.type == "error" and "Incorrect API key" in echoed.error.message
    assert node_key not in echoed.error.message
    with flows.open("rb") as f:
        saved = [flow for flow in io.FlowReader(f).stream() if getattr(flow, "websocket", None) is not None]
    (sock,) = saved
    auth = sock.request.headers["authorization"]
    assert node_key not in auth and auth.startswith("Bearer sk-")
    assert len(sock.websocket.messages) > 4  # the turns' messages are shown (kept within codex_keep_body)
    assert not [m for m in sock.websocket.messages if node_key.encode() in m.content]
    assert node_key not in repr(sock.get_state())


def _self_signed(tmp_path, host: str) -> tuple[ssl.SSLContext, str]:
    """A server context for ``host`` and the path of its certificate (the one a client is to trust)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, host)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "node.pem", tmp_path / "node.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert_path, key_path)
    return tls, str(cert_path)


def test_in_upstream_mode_the_relays_checks_reach_the_node_through_the_upstream_proxy(sqlite_url, tmp_path):
    """``--mode upstream:http://proxy``: the node's name resolves nowhere but at the proxy (as where only a corporate
    proxy reaches out). The relay's connect probe, its upgrade check and the socket itself each reach the node by a
    CONNECT through the proxy (mitmproxy's way for a TLS node), nothing goes around it, and the proxy sees the
    node's key nowhere (it is inside TLS to the node). The socket's turn is a row with the node's usage."""
    tls, cert = _self_signed(tmp_path, "node.invalid")
    ws = WsUpstream(tls=tls).start()
    node_key = "sk-node-key-0123456789abcdef"
    try:
        nodes = tmp_path / "nodes.toml"
        nodes.write_text(f'[[nodes]]\nid = "ws"\nbase_url = "https://node.invalid:{ws.port}/v1"\n'
                         f'api_key = "{node_key}"\n')
        with ConnectProxy({"node.invalid": ("127.0.0.1", ws.port)}) as proxy:
            options = {"codex_nodes": str(nodes), "codex_ping_interval": "0", "ssl_verify_upstream_trusted_ca": cert}
            with RelayProcess(db_url=sqlite_url, options=options, mode=f"upstream:http://127.0.0.1:{proxy.port}"
                              ) as relay:
                client = openai.OpenAI(base_url=f"{relay.url}/v1", api_key="client-key", max_retries=0)
                with client.responses.connect(max_retries=0) as conn:
                    events = turn(conn, (30, 0, 5, 0))
            assert relay.proc is not None and relay.proc.returncode == 0, relay.output()
    finally:
        ws.stop()
    assert events[-1].type == "response.completed"
    # the connect probe, the upgrade check, the socket: each a tunnel through the proxy
    assert proxy.connects == [f"node.invalid:{ws.port}"] * 3
    assert [h["authorization"] for h in ws.headers] == [f"Bearer {node_key}"] * 2  # the check and the socket
    assert node_key.encode() not in proxy.received
    eng = sa.create_engine(sqlite_url)
    try:
        with eng.connect() as c:
            rows = c.execute(sa.text(
                "SELECT node_id, status, input_tokens, output_tokens FROM codex_invocations")).all()
    finally:
        eng.dispose()
    assert [tuple(r) for r in rows] == [("ws", "success", 30, 5)]
