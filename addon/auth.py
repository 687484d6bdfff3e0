"""Client auth: only clients holding one of the relay's own keys reach a node.

With ``codex_client_keys`` set, every request must carry one of those keys as
``Authorization: Bearer <key>``, ``x-api-key: <key>`` or (through the relay as a forward proxy)
``Proxy-Authorization: Bearer <key>`` / ``Basic base64(<any user>:<key>)``; any other request is
answered here with HTTP 401 in the client's API shape and never reaches a node. The check runs in
``requestheaders``, before mitmproxy reads the request body, and a refused body is never held
(``addon.refusal``). A refused request is not an invocation: it is not recorded and counts against
no node. An accepted request carries the key's *name* (never the key) in
``flow.metadata[CLIENT_KEY_NAME]``, which the relay records as ``client_key``.

In regular (forward proxy) mode a ``CONNECT`` needs a client key in ``Proxy-Authorization`` (else 407):
an open CONNECT would make the relay a TCP relay for anyone. Requests inside an authorised tunnel
are that client's.

Not checked: the admin page's own paths on the relay's port (reverse mode; it has its own token),
and replayed flows (the relay's retries are replays of copies that already carry a node's key; a
replay from mitmweb is the operator's own).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
from pathlib import Path

from mitmproxy import ctx, exceptions, http
from mitmproxy.proxy.mode_specs import ReverseMode

from addon.egress import credentials_in
from addon.errors import CLIENT_KEY_NAME, error_response, fail_closed
from addon.limits import Limits
from addon.refusal import RefusalSink, answered
from addon.secrets import KnownSecrets, digest
from addon.target import is_admin_path, is_user_stats_path
from store.keys import MAX_NAME_CHARS, KeySpec, parse_keys_toml, toml_file

log = logging.getLogger("codex.auth")



def parse_client_keys(spec: str) -> list[tuple[str, str]]:
    """``(name, key)`` pairs from the option's value; ValueError says what is wrong.

    ``spec`` is a comma-separated list of ``name=key`` or bare keys, or ``@path`` of a file with one
    entry per line (blank lines and ``#`` comment lines ignored). ``name=key`` splits at the first
    ``=``, so a key that contains ``=`` needs a name. A bare key is named ``key-`` plus the first
    8 hex digits of its SHA-256: stable across restarts, and it does not reveal the key. Messages
    name entries by position, never by their key.
    """
    spec = spec.strip()
    if spec.startswith("@"):
        path = Path(spec[1:].strip()).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
        entries = [(f"{path} line {n}", line.strip()) for n, line in enumerate(text.splitlines(), 1)]
        entries = [(where, line) for where, line in entries if line and not line.startswith("#")]
    else:
        entries = [(f"entry {n}", item.strip()) for n, item in enumerate(spec.split(","), 1)]
        entries = [(where, item) for where, item in entries if item]
    if not entries:
        raise ValueError("no keys given (expected name=key or bare keys, comma-separated, or @file)")
    pairs: list[tuple[str, str]] = []
    names: set[str] = set()
    keys: set[str] = set()
    for where, entry in entries:
        name, sep, key = entry.partition("=")
        name, key = (name.strip(), key.strip()) if sep else ("", entry)
        if sep and not name:
            raise ValueError(f"{where}: empty name before '='")
        if not key:
            raise ValueError(f"{where}: empty key")
        if any(c.isspace() for c in key):
            raise ValueError(f"{where}: the key contains whitespace")
        if not name:
            name = "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]
        if len(name) > MAX_NAME_CHARS or not name.isprintable():
            raise ValueError(f"{where}: the name must be 1 to {MAX_NAME_CHARS} printable characters")
        if name in names:
            raise ValueError(f"{where}: the name {name!r} is used twice")
        if key in keys:
            raise ValueError(f"{where}: the same key is listed twice")
        names.add(name)
        keys.add(key)
        pairs.append((name, key))
    return pairs


class ClientAuth:
    def __init__(self, refusals: RefusalSink | None = None, secrets: KnownSecrets | None = None,
                 limits: Limits | None = None) -> None:
        self.refusals = refusals or RefusalSink()
        self.secrets = secrets or KnownSecrets()
        self.limits = limits  # gets each key's limits (store.keys) when the option changes
        self._keys: list[tuple[str, bytes]] = []  # (name, SHA-256 of the key): the keys are not kept
        self._tunnels: dict[str, str] = {}  # client connection id -> key name of its authorised CONNECT

    def load(self, loader) -> None:
        loader.add_option(
            "codex_client_keys", str, "",
            "Keys clients must send (Authorization: Bearer <key> or x-api-key) to use the relay: "
            "comma-separated name=key or bare keys, or @path of a file with one name=key per line "
            "(# comments), or @path of a TOML file of [[keys]] with limits (docs/teams.md). "
            "Other requests get HTTP 401 and reach no node. The key's name is recorded "
            "as client_key. Empty: no client auth.")

    def configure(self, updated: set[str]) -> None:
        if "codex_client_keys" not in updated:
            return
        spec = ctx.options.codex_client_keys
        specs: list[KeySpec] = []
        text = None
        try:
            if spec.strip():
                text = toml_file(spec)
                specs = (parse_keys_toml(text, MAX_NAME_CHARS) if text is not None else
                         [KeySpec(name, digest(key)) for name, key in parse_client_keys(spec)])
            if self.limits is not None:
                self.limits.set_keys(specs)
        except ValueError as e:
            where = f"{spec.strip()[1:].strip()}: " if text is not None else ""
            raise exceptions.OptionsError(f"codex_client_keys: {where}{e}") from None
        self._keys = [(s.name, s.key_digest) for s in specs]
        self.secrets.client_digests = frozenset(d for _, d in self._keys)
        if specs:
            log.info("client auth: %d key(s): %s", len(specs), ", ".join(s.name for s in specs))

    @property
    def enabled(self) -> bool:
        """Whether client keys are configured."""
        return bool(self._keys)

    def name_of(self, key: str) -> str | None:
        """The name of a client key given as such (the usage endpoint's ``apiKey``), or None."""
        key = key.strip()
        # A JSON string may hold what no key has: a lone surrogate (no UTF-8 to hash), a control character.
        return self._name_of(key) if key.isprintable() else None

    def _name_of(self, candidate: str) -> str | None:
        found = None
        if candidate:
            d = digest(candidate)
            for name, key_digest in self._keys:
                # No early exit: the time taken does not depend on which key matched.
                if self.secrets.same_digest(d, key_digest) and found is None:
                    found = name
        return found

    def own_endpoint(self, flow: http.HTTPFlow) -> bool:
        """Whether the relay answers this request itself, needing no client key: on its own port (reverse mode;
        in regular mode such a path belongs to whatever site the client asked for), the admin page and /metrics
        (their own token) and, with client keys set, the usage endpoint (addon.userstats: the key in its body,
        as claude-relay-service takes it)."""
        if not isinstance(flow.client_conn.proxy_mode, ReverseMode):
            return False
        path = flow.request.path
        return is_admin_path(path) or (bool(self._keys) and is_user_stats_path(path))

    def identify(self, headers: http.Headers) -> str | None:
        """The name of the client key these request headers carry, or None."""
        present = credentials_in(headers)
        candidates = [v.strip() for v in present.get("x-api-key", ())]
        for name in ("authorization", "proxy-authorization"):
            for value in present.get(name, ()):
                candidates.extend(_credentials(value))
        names = [self._name_of(c) for c in candidates]
        return next((n for n in names if n is not None), None)

    @fail_closed
    def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not self._keys:
            return
        name = self.identify(flow.request.headers)
        if name is not None:
            self._tunnels[flow.client_conn.id] = name
            return
        given = "proxy-authorization" in flow.request.headers
        flow.response = error_response(
            flow.request.path, 407, "codex-relay: proxy authentication required: send a client key as "
            "'Proxy-Authorization: Basic base64(user:<key>)' or 'Proxy-Authorization: Bearer <key>'",
            "proxy_auth_required", proxy_authenticate='Basic realm="codex-relay"')
        flow.comment = "client auth: " + ("incorrect proxy key" if given else "no proxy key")

    def client_disconnected(self, client) -> None:
        self._tunnels.pop(client.id, None)

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if answered(flow) or flow.is_replay or not self._keys:
            return
        if self.own_endpoint(flow):
            return
        name = self.identify(flow.request.headers) or self._tunnels.get(flow.client_conn.id)
        if name is not None:
            flow.metadata[CLIENT_KEY_NAME] = name
            return
        given = any(h in flow.request.headers for h in ("authorization", "x-api-key", "proxy-authorization"))
        message = ("codex-relay: incorrect API key provided" if given else
                   "codex-relay: no API key provided; send one of the relay's client keys as "
                   "'Authorization: Bearer <key>' or 'x-api-key: <key>'")
        reason = "incorrect key" if given else "no key"
        self.refusals.refuse(flow, error_response(flow.request.path, 401, message, "invalid_api_key",
                                                  www_authenticate='Bearer realm="codex-relay"'),
                             "client auth: " + reason)
        flow.comment = "client auth: " + reason
        # The route without its query string: a client may put a key there by mistake.
        log.debug("client %s: %s %s rejected: %s", flow.client_conn.peername, flow.request.method,
                  flow.request.path.partition("?")[0], reason)


def _credentials(value: str) -> list[str]:
    """The secrets a credential header value may carry: a bearer token, or a Basic password (and user)."""
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() == "bearer":
        return [token]
    if scheme.lower() == "basic":
        try:
            user, _, password = base64.b64decode(token, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return []
        return [password, user]
    return []
