"""Timeouts inside a call, against the real relay: a stream that stalls is ended and counted against its node."""

from __future__ import annotations

import contextlib
import http.client
import json
import threading

import pytest
from mitmproxy import io

from tests.support.calls import FAST, PATHS, write_nodes
from tests.support.databases import nodes_row, rows
from tests.support.fakeupstream import Behaviour, FakeUpstream
from tests.support.relayproc import RelayProcess
from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e


def test_stalled_stream_ends_as_truncated_node_failure_and_mitmweb_keeps_what_came(tmp_path):
    flows = tmp_path / "flows.mitm"
    db_url = f"sqlite:///{tmp_path / 'codex.db'}"
    hold = threading.Event()
    with FakeUpstream("stall", behaviour=Behaviour(hold=hold)) as up:
        nodes = write_nodes(tmp_path / "n.toml", [("stall", up.base_url, "sk-stall-0000111122223333", 1)])
        opts = {"codex_nodes": str(nodes), "codex_idle_timeout": "0.5", **FAST}
        try:
            with RelayProcess(db_url=db_url, options=opts, extra_args=["-w", str(flows)]) as relay:
                conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=30)
                body = {"model": "gpt-5-codex", "stream": True, "input": "hi"}
                conn.request("POST", PATHS["responses"], json.dumps(body), {"content-type": "application/json"})
                resp = conn.getresponse()
                assert resp.status == 200
                got = b""
                with contextlib.suppress(http.client.IncompleteRead, OSError):
                    while chunk := resp.read1(65536):  # ends when the relay cuts the stalled stream
                        got += chunk
                assert b"response.created" in got and b"response.completed" not in got
                (row,) = wait_for(lambda: rows(db_url, "SELECT * FROM codex_invocations"), 30, "the row")
        finally:
            hold.set()
    assert row.status == "truncated" and "no bytes from the node for 0.5 s" in row.error_message
    node = nodes_row(db_url)["stall"]
    assert (node.requests, node.fail_count, node.fail_streak) == (1, 1, 1)
    # mitmweb / -w show the part of the stream that came, not "content is missing".
    with flows.open("rb") as f:
        (saved,) = [fl for fl in io.FlowReader(f).stream() if fl.request.path.endswith("/responses")]
    assert saved.response is not None and b"response.created" in saved.response.raw_content
