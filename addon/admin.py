"""The admin page: stats, node health, node and client key management, served by the relay on its own port.

``/admin`` (HTML), ``/admin/api/…`` (JSON) and ``/metrics`` (Prometheus) are answered in the
``request`` hook by setting ``flow.response``: such flows never go upstream and are never metered
(the relay skips flows that already have a response). Database work runs in a thread, so the proxy
keeps relaying meanwhile.
The database, the nodes and the poller's state are the runtime's services (``addon.services.runtime``),
reached through their public interfaces only. Behind a balancer any relay may answer: every panel reads the shared
database (the relays and their writers from their heartbeats, ``store.relays``), never this relay's memory, but
for the reconciliation's last polls.

Access: with ``codex_admin_token`` set, every request but the login form and the static files needs
``Authorization: Bearer <token>`` or the cookie ``POST /admin/login`` sets (else 401). Without a token
only loopback clients get in (else 403), and a browser's change request must come from a loopback
page (its ``Origin``), so another web site open in the same browser cannot edit nodes. Either way a
request whose ``Host`` is a name other than ``localhost`` or one in ``codex_admin_hosts`` gets 403
(IP literals are always fine): a page of another site that rebinds its name to this machine cannot
read the admin API. A node's stored key never follows the node to another origin: changing its
scheme, host or port on the page needs the key again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import html
import ipaddress
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import sqlalchemy as sa
from mitmproxy import ctx, exceptions, http
from mitmproxy.proxy.mode_specs import ReverseMode

from addon.errors import fail_closed
from addon.guard.secrets import secrets_equal
from addon.guard.target import METRICS_PATH, is_admin_path, is_loopback_host
from addon.limits import Limits
from addon.nodes.nodeurl import origin_of
from addon.observe.metrics import CONTENT_TYPE as METRICS_TYPE
from addon.refusal import answered
from addon.services.runtime import Runtime
from store import keyrows, relays, stats
from store.budgets import as_of, uses_of
from store.config import ConfigError, node_from_mapping
from store.engine import error_line
from store.key_usage import per_key
from store.keys import LIMIT_FIELDS
from store.nodes import NodeInUse, config_of, load_nodes, owned_fields
from store.records import NodeConfig
from store.sources.reconcile import ReconcileError, as_json, reconcile

log = logging.getLogger("codex.admin")

PREFIX = "/admin"
COOKIE = "codex_admin"
STATIC = Path(__file__).resolve().parent / "static"
STATIC_TYPES = {"admin.html": "text/html; charset=utf-8", "admin.js": "text/javascript; charset=utf-8",
                "admin.css": "text/css; charset=utf-8"}
MAX_RECENT = 500
_NODE = re.compile(r"^/admin/api/nodes/([^/]+)$")
_NODE_ACTION = re.compile(r"^/admin/api/nodes/([^/]+)/(enable|disable)$")
_KEY = re.compile(r"^/admin/api/keys/([^/]+)$")
_KEY_ACTION = re.compile(r"^/admin/api/keys/([^/]+)/(rotate|revoke)$")
_SECURITY_HEADERS = {
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "content-security-policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
                               "form-action 'self'; base-uri 'none'",
}


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def is_loopback(peername: Any) -> bool:
    """Whether a client address (host, port, …) is this machine's."""
    try:
        ip = ipaddress.ip_address(str(peername[0]).split("%", 1)[0])
    except (ValueError, TypeError, IndexError):
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _loopback_origin(origin: str) -> bool:
    return is_loopback_host(urlsplit(origin).hostname or "")


def session_cookie(token: str) -> str:
    """The login cookie's value: derived from the token, so it is not the token itself and a new
    token logs every browser out."""
    return hmac.new(token.encode(), b"codex-relay admin session", hashlib.sha256).hexdigest()


def _response(status: int, body: bytes | str, content_type: str, **headers: str) -> http.Response:
    return http.Response.make(status, body, {"content-type": content_type, **_SECURITY_HEADERS, **headers})


def json_response(status: int, obj: Any, **headers: str) -> http.Response:
    return _response(status, json.dumps(obj, default=str), "application/json", **headers)


def _login_page(status: int, message: str = "") -> http.Response:
    note = f'<p class="error">{html.escape(message)}</p>' if message else ""
    page = ('<!doctype html><html lang="en"><head><meta charset="utf-8"><title>codex-relay admin: log in</title>'
            '<link rel="stylesheet" href="/admin/static/admin.css"></head><body class="login">'
            '<form method="post" action="/admin/login"><h1>codex-relay admin</h1>'
            f'{note}<label>Admin token <input type="password" name="token" autofocus required></label>'
            '<button type="submit">Log in</button></form></body></html>')
    return _response(status, page, "text/html; charset=utf-8")


def _filters(query: Any) -> stats.Filters:
    def day(name: str) -> dt.date | None:
        value = query.get(name) or None
        if value is None:
            return None
        try:
            return dt.date.fromisoformat(value)
        except ValueError:
            raise HttpError(400, f"{name} must be YYYY-MM-DD, got {value!r}") from None

    f = stats.Filters(since=day("since"), until=day("until"), source=query.get("source") or None,
                      node=query.get("node") or None, model=query.get("model") or None)
    if f.since and f.until and f.since > f.until:
        raise HttpError(400, f"since {f.since} is after until {f.until}")
    return f


class Admin:
    """Answers ``/admin`` on the relay's port; construct it with the Runtime whose nodes it manages."""

    def __init__(self, runtime: Runtime, limits: Limits | None = None) -> None:
        self.runtime = runtime
        self.limits = limits  # client keys' limits, for the keys panel
        self._token = ""
        self._hosts: frozenset[str] = frozenset()

    def load(self, loader) -> None:
        loader.add_option("codex_admin_token", str, "",
                          "Token for the admin page at /admin (at least 16 characters): clients send "
                          "'Authorization: Bearer <token>' or log in with it in the browser. Unset: "
                          "only clients on this machine (loopback) can open the admin page.")
        loader.add_option("codex_admin_hosts", str, "",
                          "Comma-separated host names (besides localhost and IP addresses) under which the "
                          "admin page answers, e.g. relay.example.com; other Host headers get 403.")

    def configure(self, updated: set[str]) -> None:
        if "codex_admin_token" in updated:
            token = ctx.options.codex_admin_token
            if token and (len(token) < 16 or not token.isprintable() or any(c.isspace() for c in token)):
                raise exceptions.OptionsError("codex_admin_token must be at least 16 printable characters "
                                              "without spaces")
            self._token = token
        if "codex_admin_hosts" in updated:
            self._hosts = frozenset(h.strip().lower().rstrip(".") for h in ctx.options.codex_admin_hosts.split(",")
                                    if h.strip())

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        if answered(flow) or not self._is_admin(flow):
            return
        try:
            flow.response = await self._answer(flow)
        except HttpError as e:
            flow.response = json_response(e.status, {"error": e.message})
        except sa.exc.SQLAlchemyError as e:
            # The driver's message only: SQLAlchemy's own text lists the statement's parameters (API keys).
            reason = error_line(e)[:300]
            log.warning("admin %s %s: database error: %s", flow.request.method, flow.request.path, reason)
            flow.response = json_response(503, {"error": f"database: {reason}"})
        except Exception:
            log.exception("admin %s %s failed", flow.request.method, flow.request.path)
            flow.response = json_response(500, {"error": "internal error: see the relay's log"})

    @staticmethod
    def _is_admin(flow: http.HTTPFlow) -> bool:
        # In regular (forward proxy) mode /admin belongs to whatever site the client asked for.
        return isinstance(flow.client_conn.proxy_mode, ReverseMode) and is_admin_path(flow.request.path)

    def _known_host(self, flow: http.HTTPFlow) -> bool:
        """Whether the Host the client addressed is this relay's (see the module docstring)."""
        host_header = flow.request.host_header
        if host_header is None:
            return True  # no browser omits it; a DNS-rebinding page cannot
        host = urlsplit("//" + host_header).hostname or ""
        return host in ("localhost", *self._hosts) or _is_ip(host)

    # -- access ------------------------------------------------------------------------------------
    def _authorised(self, flow: http.HTTPFlow) -> bool:
        auth = flow.request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer " and secrets_equal(auth[7:].strip(), self._token):
            return True
        return secrets_equal(flow.request.cookies.get(COOKIE, ""), session_cookie(self._token))

    def _denied(self, flow: http.HTTPFlow, path: str) -> http.Response | None:
        """The refusal for a request that may not reach ``path``, or None."""
        if not self._known_host(flow):
            return json_response(403, {"error": "unknown Host: open the admin page by this machine's address or "
                                                "a name listed in codex_admin_hosts"})
        if not self._token:
            if not is_loopback(flow.client_conn.peername):
                return json_response(403, {"error": "the admin page answers only clients on this machine; "
                                                    "set codex_admin_token to open it to others"})
            origin = flow.request.headers.get("origin")
            if flow.request.method != "GET" and origin is not None and not _loopback_origin(origin):
                return json_response(403, {"error": f"changes from pages of {origin} are refused"})
            return None
        if path.startswith(PREFIX + "/static/") or path == PREFIX + "/login" or self._authorised(flow):
            return None
        if path.startswith(PREFIX + "/api/") or path == METRICS_PATH:
            return json_response(401, {"error": "admin token required"}, **{"www-authenticate": "Bearer"})
        return _login_page(401)

    # -- routing -----------------------------------------------------------------------------------
    async def _answer(self, flow: http.HTTPFlow) -> http.Response:
        path = flow.request.path.split("?", 1)[0].rstrip("/") or "/"
        denied = self._denied(flow, path)
        if denied is not None:
            return denied
        method = flow.request.method
        if path == PREFIX:
            self._method(method, "GET")
            return await self._static("admin.html")
        if path.startswith(PREFIX + "/static/"):
            self._method(method, "GET")
            return await self._static(path.removeprefix(PREFIX + "/static/"))
        if path == METRICS_PATH:
            self._method(method, "GET")
            # In a thread: the writer's journal age is read from its SQLite file.
            return _response(200, await asyncio.to_thread(self.runtime.metrics.scrape), METRICS_TYPE)
        if path == PREFIX + "/login":
            self._method(method, "POST")
            return self._login(flow)
        if path == PREFIX + "/logout":
            self._method(method, "POST")
            return _response(303, "", "text/plain", location=PREFIX,
                             **{"set-cookie": f"{COOKIE}=; Path={PREFIX}; Max-Age=0; HttpOnly; SameSite=Strict"})
        if method == "DELETE":
            m = _NODE.match(path)
            if m is None:
                raise HttpError(405, "only a node can be deleted (DELETE /admin/api/nodes/ID)")
            node_id = unquote(m.group(1))
            await asyncio.to_thread(self._delete_node, node_id)
            log.info("admin: node %s deleted", node_id)
            return json_response(200, {"deleted": node_id})
        if method in ("POST", "PATCH"):
            if flow.request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
                raise HttpError(415, "send changes as application/json")
            return await self._change(flow, path)
        self._method(method, "GET")
        m = _KEY.match(path)
        if m is not None:
            key = await asyncio.to_thread(self._key, unquote(m.group(1)), _filters(flow.request.query))
            return json_response(200, key)
        return await self._read(flow, path)

    @staticmethod
    def _method(method: str, allowed: str) -> None:
        if method != allowed:
            raise HttpError(405, f"use {allowed}")

    async def _static(self, name: str) -> http.Response:
        content_type = STATIC_TYPES.get(name)
        if content_type is None:
            raise HttpError(404, f"no file {name!r}")
        body = await asyncio.to_thread((STATIC / name).read_bytes)
        return _response(200, body, content_type)

    def _login(self, flow: http.HTTPFlow) -> http.Response:
        if not self._token:
            return _response(303, "", "text/plain", location=PREFIX)
        if not secrets_equal(flow.request.urlencoded_form.get("token", ""), self._token):
            log.warning("admin: failed login from %s", flow.client_conn.peername[0])
            return _login_page(401, "Wrong token.")
        cookie = f"{COOKIE}={session_cookie(self._token)}; Path={PREFIX}; HttpOnly; SameSite=Strict"
        return _response(303, "", "text/plain", location=PREFIX, **{"set-cookie": cookie})

    async def _read(self, flow: http.HTTPFlow, path: str) -> http.Response:
        query = flow.request.query
        f, limit, date = _filters(query), _limit(query.get("limit")), query.get("date") or None
        readers: dict[str, Callable[[], Any]] = {
            "/api/nodes": lambda: {"nodes": self._nodes(f)},
            "/api/models": lambda: {"models": self._query(stats.per_model, f)},
            "/api/sources": lambda: {"sources": self._query(stats.per_source, f)},
            "/api/days": lambda: {"days": self._query(stats.per_day, f)},
            "/api/hours": lambda: {"hours": self._query(stats.per_hour, f)},
            "/api/recent": lambda: {"invocations": self._query(stats.recent_invocations, f, limit,
                                                               query.get("key") or None)},
            "/api/overview": lambda: {"overview": self._overview(f)},
            "/api/relays": self._relays,
            "/api/session": lambda: {"login": bool(self._token)},  # whether the page shows "Log out"
            "/api/reconcile": lambda: self._reconcile(date),
            "/api/keys": lambda: {"keys": self._keys(f), "stored": self._stored_keys()},
        }
        reader = readers.get(path.removeprefix(PREFIX))
        if reader is None:
            raise HttpError(404, f"no such page: {path}")
        return json_response(200, await asyncio.to_thread(reader))

    async def _change(self, flow: http.HTTPFlow, path: str) -> http.Response:
        try:
            body = json.loads(flow.request.get_text() or "{}")
        except ValueError as e:
            raise HttpError(400, f"body is not JSON: {e}") from None
        if path == PREFIX + "/api/keys" or path.startswith(PREFIX + "/api/keys/"):
            return await asyncio.to_thread(self._change_key, flow.request.method, path, body)
        single = _NODE.match(path)
        if path == PREFIX + "/api/nodes" or single is not None:
            if single is not None:  # PATCH /api/nodes/ID: a node that exists, its id in the path
                self._method(flow.request.method, "PATCH")
                if not isinstance(body, dict):
                    raise HttpError(400, "send a JSON object")
                body = {**body, "id": unquote(single.group(1))}
            else:
                self._method(flow.request.method, "POST")
            node = await asyncio.to_thread(self._save_node, body, single is not None)
            log.info("admin: node %s saved (weight %s, %s)", node["node_id"], node["weight"], node["base_url"])
            return json_response(200, {"node": node})
        self._method(flow.request.method, "POST")
        m = _NODE_ACTION.match(path)
        if m is None:
            raise HttpError(404, f"no such action: {path}")
        node_id, disable = unquote(m.group(1)), m.group(2) == "disable"
        node = await asyncio.to_thread(self._set_disabled, node_id, disable)
        log.info("admin: node %s %s", node_id, "disabled" if disable else "enabled")
        return json_response(200, {"node": node})

    # -- work done in a thread ---------------------------------------------------------------------
    def _engine(self) -> sa.Engine:
        engine = self.runtime.engine
        if engine is None:
            raise HttpError(503, "the stats database is not open")
        return engine

    def _query(self, fn: Callable[..., list], *args: Any) -> list[dict]:
        with self._engine().connect() as conn:
            return [row.as_dict() for row in fn(conn, *args)]

    def _nodes(self, f: stats.Filters) -> list[dict]:
        rows = self._query(stats.per_node, f)
        for row in rows:
            # What the fleet does with it, from the database (not the answering relay's pool): "status" is the
            # stored flag; a node kept for its stats but neither in the nodes file (as the relays' starts applied
            # it) nor added on a page gets no calls, whatever that flag says.
            row["routed"] = row["origin"] == "admin" or bool(row["file_fields"])
            row["state"] = row["status"] if row["status"] is None or row["routed"] else "not routed"
        return rows

    def _save_node(self, body: Any, existing: bool = False) -> dict:
        """Add a node, or change the fields ``body`` gives of a stored one (the others keep their values; an
        empty api_key keeps the stored key). The fields the nodes file sets for it are the file's: a change to
        one is refused (409). ``existing``: 404 when there is no such node."""
        if not isinstance(body, dict):
            raise HttpError(400, "send a JSON object")
        if body.get("api_key") == "":
            body = {k: v for k, v in body.items() if k != "api_key"}
        with self._engine().connect() as conn:
            stored = next((r for r in load_nodes(conn) if r.id == body.get("id")), None)
        if stored is None and existing:
            raise HttpError(404, f"no node {body.get('id')!r}")
        before = config_of(stored) if stored is not None else None
        owned = owned_fields(stored.file_fields) if stored is not None else []
        try:
            config = node_from_mapping(body if before is None else {**_as_mapping(before), **body}, "node")
        except ConfigError as e:
            raise HttpError(400, str(e)) from None
        if before is not None:
            changed = [f for f in owned if getattr(config, f) != getattr(before, f)]
            if changed:
                raise HttpError(409, f"node {config.id}: {', '.join(changed)} set by the nodes file (codex_nodes): "
                                     "change it there (the page may change the fields the file leaves out)")
            if "api_key" not in body and before.api_key and origin_of(before.base_url) != origin_of(config.base_url):
                raise HttpError(400, "base_url moves the node to another scheme, host or port: give its "
                                     "api_key again (a stored key never follows a node elsewhere)")
        self.runtime.fleet.update_node(config)
        return self._nodes(stats.Filters(node=config.id))[0]

    def _delete_node(self, node_id: str) -> None:
        try:
            if not self.runtime.fleet.delete_node(node_id):
                raise HttpError(404, f"no node {node_id!r}")
        except NodeInUse as e:
            raise HttpError(409, str(e)) from None

    def _set_disabled(self, node_id: str, disable: bool) -> dict:
        self._engine()
        if not self.runtime.fleet.set_node_disabled(node_id, disable):
            raise HttpError(404, f"no node {node_id!r}")
        return self._nodes(stats.Filters(node=node_id))[0]

    def _keys(self, f: stats.Filters) -> list[dict]:
        """Per client key, one UTC day (``until``, default today): usage, refusals, and each limit's use."""
        day = f.until or dt.datetime.now(dt.UTC).date()
        with self._engine().connect() as conn:
            rows = per_key(conn, day)
            uses = uses_of(conn, self.limits.runtime.keys.specs.values(), as_of(day)) if self.limits else {}
        if self.limits is None:
            return [r.as_dict() for r in rows]
        return self.limits.report(rows, day, uses)

    def _stored_keys(self) -> list[dict]:
        """Every key in the database (the file's and those made here or by the CLI), revoked ones too."""
        with self._engine().connect() as conn:
            return [keyrows.describe(r) for r in keyrows.load_keys(conn)]

    def _key(self, name: str, f: stats.Filters) -> dict:
        """One stored key and its usage of one day (``until``, default today)."""
        stored = next((k for k in self._stored_keys() if k["name"] == name), None)
        if stored is None:
            raise HttpError(404, f"no key {name!r}")
        return {"key": stored, "usage": next((r for r in self._keys(f) if r["client_key"] == name), None)}

    def _change_key(self, method: str, path: str, body: Any) -> http.Response:
        """Add (POST /api/keys), change (PATCH /api/keys/NAME), rotate or revoke a key (POST …/NAME/rotate,
        …/revoke); every relay on the database applies it within ``codex_key_sync``, this one at once. A new
        secret is in this answer only: the database keeps its SHA-256, the log never has it."""
        if not isinstance(body, dict):
            raise HttpError(400, "send a JSON object")
        key, action = _KEY.match(path), _KEY_ACTION.match(path)
        allowed = set(LIMIT_FIELDS) | ({"name"} if key is None and action is None else set())
        unknown = sorted(set(body) - allowed) if action is None else []
        if unknown:
            raise HttpError(400, f"unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(allowed))})")
        secret = None
        try:
            with self._engine().begin() as conn:
                if path == PREFIX + "/api/keys":
                    self._method(method, "POST")
                    name = body.get("name")
                    secret = keyrows.create_key(conn, name, body)
                    status, what = 201, "added"
                elif key is not None:
                    self._method(method, "PATCH")
                    name = unquote(key.group(1))
                    keyrows.update_key(conn, name, body)
                    status, what = 200, f"changed ({', '.join(sorted(body)) or 'nothing'})"
                elif action is not None:
                    self._method(method, "POST")
                    name = unquote(action.group(1))
                    if action.group(2) == "rotate":
                        secret = keyrows.rotate_key(conn, name)
                    else:
                        keyrows.revoke_key(conn, name)
                    status, what = 200, f"{action.group(2)}d"
                else:
                    raise HttpError(404, f"no such page: {path}")
                row = next(r for r in keyrows.load_keys(conn) if r.name == name)
        except ValueError as e:
            raise HttpError(400, str(e)) from None
        except keyrows.NoSuchKey:
            raise HttpError(404, f"no key {name!r}") from None
        except keyrows.KeyConflict as e:
            raise HttpError(409, str(e)) from None
        self.runtime.keys.reload()
        log.info("admin: key %s %s", name, what)
        answer: dict[str, Any] = {"key": keyrows.describe(row)}
        if secret is not None:
            answer["secret"] = secret  # shown once: nobody can read it again
        return json_response(status, answer)

    def _overview(self, f: stats.Filters) -> dict:
        """The fleet's day ``until`` (default today, UTC)."""
        with self._engine().connect() as conn:
            return stats.overview(conn, f.until or dt.datetime.now(dt.UTC).date()).as_dict()

    def _relays(self) -> dict:
        """Every relay on the database by its heartbeat, and which one answers."""
        with self._engine().connect() as conn:
            return {"relays": relays.fleet(conn), "answered_by": self.runtime.heartbeat.relay}

    def _reconcile(self, date: str | None) -> dict:
        """Each daily stats source the relay polls against the relay's own calls, and its last poll."""
        sources = self.runtime.providers.sources
        if sources is None:
            return {"configured": False, "results": [], "polls": []}
        try:
            day = dt.date.fromisoformat(date) if date else dt.datetime.now(dt.UTC).date()
        except ValueError:
            raise HttpError(400, f"date must be YYYY-MM-DD, got {date!r}") from None
        results = []
        with self._engine().connect() as conn:
            for source in sources:
                try:
                    results.append(as_json(reconcile(conn, source, day)))
                except ReconcileError as e:  # not a daily source, or no nodes named
                    results.append({"source": source.name, "stats_date": day.isoformat(), "error": str(e)})
        polls = [r.describe() for r in self.runtime.providers.last_polls()]
        return {"configured": True, "results": results, "polls": polls}


def _as_mapping(config: NodeConfig) -> dict[str, Any]:
    """A stored node's config as the body that would set it: what a partial save's fields go over."""
    return {"id": config.id, "name": config.name, "base_url": config.base_url, "api_key": config.api_key,
            "weight": config.weight, "formats": list(config.formats), "models": list(config.models),
            "model_map": config.model_map, "usage_probe": config.usage_probe, "auth_header": config.auth_header}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _limit(value: str | None) -> int:
    if not value:
        return 50
    if not value.isdigit() or not 1 <= int(value) <= MAX_RECENT:
        raise HttpError(400, f"limit must be 1 to {MAX_RECENT}, got {value!r}")
    return int(value)
