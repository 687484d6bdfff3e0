"""Client keys in the database (store.keyrows) and ``./run.sh keys`` (store.cli.keys), on SQLite and MariaDB:
the file's rule at start, the admin changes, and that no secret is ever stored."""

from __future__ import annotations

import datetime as dt
import json

import pytest
import sqlalchemy as sa

from store import keyrows
from store.cli.keys import main as keys_main
from store.keys import KeySpec
from store.masking import digest
from store.nodes import upsert_nodes
from store.records import NodeConfig
from store.schema import client_key_usage, client_keys
from tests.support.databases import fresh_engine


@pytest.fixture
def engine(db_url):
    with fresh_engine(db_url) as eng:
        with eng.begin() as conn:
            upsert_nodes(conn, [NodeConfig(id="alpha", base_url="http://127.0.0.1:9/v1")])
        yield eng


def row(engine: sa.Engine, name: str) -> sa.Row:
    with engine.connect() as conn:
        return next(r for r in keyrows.load_keys(conn) if r.name == name)


def version(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return keyrows.read_version(conn)


def test_the_file_wins_what_it_sets_and_keeps_the_rest_and_the_usage(engine):
    alice = KeySpec("alice", digest("ck-alice-0123456789"), models=("gpt-5*",), daily_requests=10)
    with engine.begin() as conn:
        keyrows.upsert_file_keys(conn, [alice])
        conn.execute(sa.insert(client_key_usage).values(day=dt.date(2026, 12, 7), client_key="alice", admitted=7,
                                                        requests=7, total_tokens=700, cost=0.5))
    v0 = version(engine)
    with engine.begin() as conn, pytest.raises(keyrows.KeyConflict, match="daily_requests set by the codex_client"):
        keyrows.update_key(conn, "alice", {"daily_requests": 50})  # a limit the file sets is the file's
    with engine.begin() as conn:  # the page adds a limit the file does not set, and revokes
        keyrows.update_key(conn, "alice", {"rpm": 30})
        keyrows.revoke_key(conn, "alice")
    assert version(engine) > v0
    with engine.begin() as conn:  # a restart: the file again
        keyrows.upsert_file_keys(conn, [alice])
    spec = keyrows.spec_of(row(engine, "alice"))
    assert (spec.key_digest, spec.models, spec.daily_requests, spec.rpm) == (alice.key_digest, ("gpt-5*",), 10, 30)
    assert row(engine, "alice").revoked_at is not None  # the file never undoes a revocation
    assert row(engine, "alice").source == "file"
    with engine.connect() as conn:
        usage = conn.execute(sa.select(client_key_usage)).one()
    assert (usage.admitted, usage.requests, usage.total_tokens, usage.cost) == (7, 7, 700, 0.5)


def test_a_file_key_may_not_take_an_admin_keys_secret_but_may_be_renamed(engine):
    with engine.begin() as conn:
        secret = keyrows.create_key(conn, "dana", {})
        keyrows.upsert_file_keys(conn, [KeySpec("alice", digest("ck-alice-0123456789"))])
    with engine.begin() as conn, pytest.raises(ValueError, match="'bob': its secret is already the key 'dana'"):
        keyrows.upsert_file_keys(conn, [KeySpec("bob", digest(secret))])
    with engine.begin() as conn:  # alice renamed alicia in the file: the same secret, a new name
        keyrows.upsert_file_keys(conn, [KeySpec("alicia", digest("ck-alice-0123456789"))])
    assert row(engine, "alicia").key_sha256 == row(engine, "alice").key_sha256 == digest("ck-alice-0123456789").hex()


def test_create_stores_only_the_digest_and_refuses_a_taken_name(engine):
    with engine.begin() as conn:
        secret = keyrows.create_key(conn, "dana", {"nodes": ["alpha"], "monthly_cost": 5})
    stored = row(engine, "dana")
    assert stored.key_sha256 == digest(secret).hex() and stored.source == "admin"
    assert secret not in json.dumps(stored._asdict(), default=str)
    assert keyrows.describe(stored)["nodes"] == ["alpha"] and keyrows.describe(stored)["monthly_cost"] == 5.0
    assert "key_sha256" not in keyrows.describe(stored)
    with engine.begin() as conn, pytest.raises(keyrows.KeyConflict, match="exists"):
        keyrows.create_key(conn, "dana", {})
    with engine.begin() as conn, pytest.raises(ValueError, match="unknown node id"):
        keyrows.create_key(conn, "erin", {"nodes": ["nowhere"]})
    with engine.begin() as conn, pytest.raises(ValueError, match="rpm must be an integer"):
        keyrows.create_key(conn, "erin", {"rpm": -1})
    with engine.begin() as conn, pytest.raises(ValueError, match="name must be"):
        keyrows.create_key(conn, "", {})


def test_update_changes_only_the_fields_given_and_none_clears(engine):
    with engine.begin() as conn:
        keyrows.create_key(conn, "dana", {"models": ["gpt-5*"], "rpm": 3, "daily_tokens": 1000})
        keyrows.update_key(conn, "dana", {"rpm": 9, "daily_tokens": None})
    spec = keyrows.spec_of(row(engine, "dana"))
    assert (spec.models, spec.rpm, spec.daily_tokens) == (("gpt-5*",), 9, None)
    with engine.begin() as conn, pytest.raises(keyrows.NoSuchKey):
        keyrows.update_key(conn, "nobody", {"rpm": 1})


def test_rotate_gives_a_new_secret_except_to_file_and_revoked_keys(engine):
    with engine.begin() as conn:
        old = keyrows.create_key(conn, "dana", {})
        keyrows.upsert_file_keys(conn, [KeySpec("alice", digest("ck-alice-0123456789"))])
    with engine.begin() as conn:
        new = keyrows.rotate_key(conn, "dana")
    assert new != old and row(engine, "dana").key_sha256 == digest(new).hex()
    with engine.begin() as conn, pytest.raises(keyrows.KeyConflict, match="file"):
        keyrows.rotate_key(conn, "alice")
    with engine.begin() as conn:
        first = keyrows.revoke_key(conn, "dana").revoked_at
        assert keyrows.revoke_key(conn, "dana").revoked_at == first  # revoking again changes nothing
    with engine.begin() as conn, pytest.raises(keyrows.KeyConflict, match="revoked"):
        keyrows.rotate_key(conn, "dana")


def test_the_cli_adds_lists_sets_rotates_and_revokes(engine, capsys):
    url = engine.url.render_as_string(hide_password=False)
    assert keys_main(["--db", url, "add", "dana", "--models", "gpt-5*,o3", "--daily-requests", "5"]) == 0
    secret = capsys.readouterr().out.strip()
    assert row(engine, "dana").key_sha256 == digest(secret).hex()
    assert keys_main(["--db", url, "set", "dana", "--daily-requests", "none", "--rpm", "4"]) == 0
    spec = keyrows.spec_of(row(engine, "dana"))
    assert (spec.models, spec.daily_requests, spec.rpm) == (("gpt-5*", "o3"), None, 4)
    capsys.readouterr()
    assert keys_main(["--db", url, "rotate", "dana"]) == 0
    rotated = capsys.readouterr().out.strip()
    assert rotated != secret and row(engine, "dana").key_sha256 == digest(rotated).hex()
    assert keys_main(["--db", url, "revoke", "dana"]) == 0
    assert keys_main(["--db", url, "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(k["name"], k["revoked"], k["rpm"]) for k in listed] == [("dana", True, 4)]
    assert rotated not in json.dumps(listed) and secret not in json.dumps(listed)
    assert keys_main(["--db", url, "rotate", "dana"]) == 1
    assert "revoked" in capsys.readouterr().err
    assert keys_main(["--db", url, "set", "nobody", "--rpm", "1"]) == 1
    with pytest.raises(SystemExit) as exit_:
        keys_main(["--db", url, "add", "erin", "--rpm", "many"])
    assert exit_.value.code == 2
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(client_keys)).scalar() == 1
