"""Bad configuration at start: one clear error line, a non-zero exit, and no traceback."""

from __future__ import annotations

import socket
import subprocess
import threading
import time

import pytest

from tests.support.fakeupstream import FakeUpstream
from tests.support.ports import free_port
from tests.support.relayproc import RelayProcess
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e


def start_fails(tmp_path, **options: str) -> list[str]:
    relay = RelayProcess(db_url=options.pop("codex_db", f"sqlite:///{tmp_path / 'codex.db'}"), options=options)
    # A fresh interpreter, not one forked warm: how the process ends (its finalization) is under test.
    proc = subprocess.run(relay.command(), capture_output=True, text=True, timeout=60, cwd=tmp_path)
    out = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 1, out  # what supervisors read as a configuration error, never a crash (139)
    assert not any("Traceback" in line for line in out), out
    return out


@pytest.mark.parametrize("options, message", [
    ({"codex_nodes": "{bad}"}, "invalid TOML"),
    ({"codex_nodes": "/no/such/nodes.toml"}, "nodes.toml"),
    ({"codex_retries": "-1"}, "codex_retries must be >= 0"),
    ({"codex_connect_timeout": "soon"}, "codex_connect_timeout must be a number of seconds"),
    ({"codex_db": "mysql+pymysql://root@127.0.0.1:1/x"}, "codex_db: cannot open mysql+pymysql://root@127.0.0.1:1/x"),
    ({"codex_db": "oracle://x@127.0.0.1/db"}, "unsupported database 'oracle'"),
    ({"codex_xyzzy": "1"}, "unknown option(s): codex_xyzzy;"),
    # Later addons refuse their options after the runtime started its writer, pinger and node sync threads.
    ({"codex_upstream": "http://127.0.0.1:9/v1", "codex_admin_token": "short"}, "codex_admin_token"),
    ({"codex_upstream": "http://127.0.0.1:9/v1", "codex_writer_process": "false", "codex_admin_token": "short"},
     "codex_admin_token"),
])
def test_bad_start_is_one_clear_line(tmp_path, options, message):
    if options.get("codex_nodes") == "{bad}":
        bad = tmp_path / "nodes.toml"
        bad.write_text("[[nodes]\nid = ")
        options = {"codex_nodes": str(bad)}
    out = start_fails(tmp_path, **options)
    assert sum(message in line for line in out) == 1, out


def _call_as_soon_as_it_listens(port: int, path: str, body: bytes, answers: list[bytes]) -> None:
    """Connect the moment the port accepts (as a balancer's check or a retrying client does) and send at once."""
    deadline = time.monotonic() + 60
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.0005)  # polling for the port to open: mitmproxy says nothing before it listens
    with sock:
        method = "POST" if body else "GET"
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        sock.sendall(head.encode() + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        answers.append(answer)


@pytest.mark.slow
def test_requests_the_moment_the_port_opens_never_kill_the_relay(tmp_path):
    """mitmproxy listens before its addons' ``running`` hooks (its certificate store among them); a request
    in between used to end the process (5 of 5 starts), then got a 503 (a relay restarted behind a balancer
    that still counted it up refused calls). Now such a request waits for the end of start-up: every request
    sent the moment the port accepts is served, on every start."""
    with FakeUpstream() as up:
        for attempt in range(5):
            port = free_port()
            relay = RelayProcess(db_url=f"sqlite:///{tmp_path / 'codex.db'}", extra_args=["-p", str(port)],
                                 options={"codex_upstream": up.base_url, "codex_upstream_key": "sk-node"})
            answers: list[bytes] = []
            clients = [threading.Thread(target=_call_as_soon_as_it_listens, args=(port, path, body, answers))
                       for path, body in (("/v1/models", b""), ("/v1/responses", b'{"model": "gpt-5-codex"}'),
                                          ("/v1/files", b"x" * 100_000))]
            relay.spawn()
            try:
                for c in clients:
                    c.start()
                for c in clients:
                    c.join(60)
                relay.ready()
                assert len(answers) == 3
                for answer in answers:
                    status = answer.split(b"\r\n", 1)[0]
                    assert status.startswith(b"HTTP/1.1 "), (attempt, answer[:300], relay.output()[-2000:])
                    assert not status.startswith(b"HTTP/1.1 503"), (attempt, answer[:300])
                assert relay.proc is not None and relay.proc.poll() is None, relay.output()
                ok = _call_as_soon_as_it_listens
                late: list[bytes] = []
                ok(port, "/v1/responses", b'{"model": "gpt-5-codex", "input": "hi"}', late)
                assert late[0].startswith(b"HTTP/1.1 200"), late[0][:300]
                summary = f"codex-relay ready; clients: http://127.0.0.1:{port}/v1"
                wait_for(lambda r=relay, s=summary: s in r.output(), 30, "the start-up summary")
            finally:
                assert relay.stop() == 0, relay.output()
