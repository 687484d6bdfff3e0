"""Two real relays on one MariaDB: what one relay does to a node reaches the other within 5 seconds."""

from __future__ import annotations

import http.client

import pytest

from tests.support.calls import HEAVY, call, write_nodes
from tests.support.fakeupstream import Behaviour, FakeUpstream
from tests.support.relayproc import RelayProcess
from tests.support.waiting import seconds_until

pytestmark = [pytest.mark.e2e, pytest.mark.mysql]


def admin_post(relay: RelayProcess, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=30)
    try:
        conn.request("POST", path, "{}", {"content-type": "application/json"})
        return conn.getresponse().status
    finally:
        conn.close()


def test_disable_enable_and_failure_cross_between_relays(mariadb, tmp_path):
    with FakeUpstream("n1") as up1, FakeUpstream("n2") as up2:
        nodes = write_nodes(tmp_path / "nodes.toml", [("n1", up1.base_url, "k1", HEAVY), ("n2", up2.base_url, "k2", 1)])
        opts = {"codex_nodes": str(nodes), "codex_ping_interval": "0", "codex_sticky_ttl": "0"}
        with RelayProcess(db_url=mariadb, options=opts | {"codex_spool": str(tmp_path / "a.spool")}) as a, \
                RelayProcess(db_url=mariadb, options=opts | {"codex_spool": str(tmp_path / "b.spool")}) as b:

            def b_avoids_n1() -> bool:  # B's next calls reach n2 although n1 weighs 10^9 times more
                before = len(up1.seen)
                statuses = [call(b, "chat", stream=False, usage=(1, 0, 1, 0))[0] for _ in range(3)]
                return statuses == [200] * 3 and len(up1.seen) == before

            def b_uses_n1() -> bool:
                before = len(up1.seen)
                return call(b, "chat", stream=False, usage=(1, 0, 1, 0))[0] == 200 and len(up1.seen) > before

            assert b_uses_n1()
            assert admin_post(a, "/admin/api/nodes/n1/disable") == 200
            assert seconds_until(b_avoids_n1, "relay B to stop routing to n1") < 5
            assert admin_post(a, "/admin/api/nodes/n1/enable") == 200
            assert seconds_until(b_uses_n1, "relay B to route to n1 again") < 5

            up1.behaviour = Behaviour(status=500)  # n1 fails; relay A's calls are retried on n2
            for _ in range(3):
                status, body = call(a, "chat", stream=False, usage=(1, 0, 1, 0))
                assert status == 200, body
            # n1 still fails: relay B must leave it alone within 5 s (a call it sends meanwhile is retried)
            assert seconds_until(b_avoids_n1, "relay B to avoid the node relay A found failed") < 5
