"""Two real relays on one MariaDB: a key made or revoked through relay A's admin API applies on relay B within 5 s;
its rpm and concurrency hold for both relays together."""

from __future__ import annotations

import http.client
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.fakeupstream import Behaviour, FakeUpstream
from tests.support.relayproc import RelayProcess
from tests.support.waiting import seconds_until

pytestmark = [pytest.mark.e2e, pytest.mark.mysql]

ALICE = "ck-alice-0123456789"


def admin_post(relay: RelayProcess, path: str, body: dict) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=30)
    try:
        conn.request("POST", path, json.dumps(body), {"content-type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def status_of(relay: RelayProcess, key: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", relay.port, timeout=30)
    try:
        conn.request("POST", "/v1/responses", json.dumps({"model": "gpt-5", "input": "hi"}),
                     {"content-type": "application/json", "authorization": f"Bearer {key}"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def test_a_key_made_and_revoked_on_relay_a_applies_on_relay_b(mariadb, tmp_path):
    with FakeUpstream("alpha") as node:
        nodes = tmp_path / "nodes.toml"
        nodes.write_text(f'[[nodes]]\nid = "alpha"\nbase_url = "{node.base_url}"\napi_key = "node-key-1"\n')
        keys = tmp_path / "keys.toml"
        keys.write_text(f'[[keys]]\nname = "alice"\nkey = "{ALICE}"\n')
        opts = {"codex_nodes": str(nodes), "codex_client_keys": f"@{keys}", "codex_ping_interval": "0"}
        with RelayProcess(db_url=mariadb, options=opts | {"codex_spool": str(tmp_path / "a.spool")}) as a, \
                RelayProcess(db_url=mariadb, options=opts | {"codex_spool": str(tmp_path / "b.spool")}) as b:
            assert status_of(b, ALICE) == 200 and status_of(b, "crk-nobody") == 401
            status, made = admin_post(a, "/admin/api/keys", {"name": "dana", "models": ["gpt-5*"]})
            assert status == 201, made
            secret = made["secret"]
            assert status_of(a, secret) == 200  # the relay that answered: at once
            assert seconds_until(lambda: status_of(b, secret) == 200, "relay B to accept the new key") < 5
            status, _ = admin_post(a, "/admin/api/keys/dana/revoke", {})
            assert status == 200
            assert status_of(a, secret) == 401
            assert seconds_until(lambda: status_of(b, secret) == 401, "relay B to refuse the revoked key") < 5
            assert status_of(b, ALICE) == 200

            # rpm and concurrency are the fleet's: counted in the database, not per relay process.
            status, made = admin_post(a, "/admin/api/keys", {"name": "erin", "rpm": 5, "concurrency": 2})
            assert status == 201, made
            erin = made["secret"]
            assert seconds_until(lambda: status_of(b, erin) == 200, "relay B to accept erin") < 5
            node.behaviour = Behaviour(first_byte_delay=1.0)  # six calls at once: all overlap
            with ThreadPoolExecutor(6) as pool:
                statuses = list(pool.map(lambda relay: status_of(relay, erin), [a, b] * 3))
            assert sorted(statuses) == [200, 200, 429, 429, 429, 429]  # 2 in flight fleet-wide, not 2 per relay
            node.behaviour = Behaviour()
            # 1 call before and 2 in the burst: 2 more are free in the minute, whichever relay is asked.
            assert [status_of(r, erin) for r in (a, b, a, b)] == [200, 200, 429, 429]
        assert secret not in "\n".join(a.lines + b.lines)  # shown once, in the answer: never logged
