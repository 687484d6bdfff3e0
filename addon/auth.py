"""Client auth: only clients holding one of the relay's own keys reach a node.

With ``codex_client_keys`` set, every request must carry one of those keys as
``Authorization: Bearer <key>`` or ``x-api-key: <key>``; any other request is answered here with
HTTP 401 in the OpenAI error shape and never reaches a node. A rejected request is not an
invocation: it is not recorded in ``codex_invocations`` and counts against no node (the relay skips
flows that already have a response). An accepted request carries the key's *name* (never the key)
in ``flow.metadata["codex_client_key"]``, which the relay records as ``client_key``.

Not checked: paths under ``/admin`` on the relay's own port, i.e. in reverse mode (the admin page
answers those itself and has its own token), and replayed flows (the relay's retries are replays of
copies that already carry a node's key; a replay from mitmweb is the operator's own).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from pathlib import Path

from mitmproxy import ctx, exceptions, http
from mitmproxy.proxy.mode_specs import ReverseMode

from addon.relay import CLIENT_KEY_NAME, error_body

log = logging.getLogger("codex.auth")

MAX_NAME_CHARS = 64  # codex_invocations.client_key is VARCHAR(64)


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


def is_admin_path(path: str) -> bool:
    """A request for the admin page, which checks its own token.

    Only plain ``/admin`` and ``/admin/...`` paths: one with a dot segment or a percent escape (e.g.
    ``/admin/../v1/responses``) could mean a model endpoint to the node and must not skip client auth.
    """
    route = path.partition("?")[0].partition("#")[0]
    if route != "/admin" and not route.startswith("/admin/"):
        return False
    return "%" not in route and "\\" not in route and not any(s in (".", "..") for s in route.split("/"))


def _digest(secret: str) -> bytes:
    # Comparing fixed-length digests keeps compare_digest from revealing a key's length.
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


class ClientAuth:
    def __init__(self) -> None:
        self._keys: list[tuple[str, bytes]] = []  # (name, SHA-256 of the key): the keys are not kept

    def load(self, loader) -> None:
        loader.add_option(
            "codex_client_keys", str, "",
            "Keys clients must send (Authorization: Bearer <key> or x-api-key) to use the relay: "
            "comma-separated name=key or bare keys, or @path of a file with one name=key per line "
            "(# comments). Other requests get HTTP 401 and reach no node. The key's name is recorded "
            "as client_key. Empty: no client auth.")

    def configure(self, updated: set[str]) -> None:
        if "codex_client_keys" not in updated:
            return
        spec = ctx.options.codex_client_keys
        if not spec.strip():
            self._keys = []
            return
        try:
            pairs = parse_client_keys(spec)
        except ValueError as e:
            raise exceptions.OptionsError(f"codex_client_keys: {e}") from None
        self._keys = [(name, _digest(key)) for name, key in pairs]
        log.info("client auth: %d key(s): %s", len(pairs), ", ".join(name for name, _ in pairs))

    def identify(self, headers: http.Headers) -> str | None:
        """The name of the client key these request headers carry, or None."""
        candidates = [v.strip() for v in headers.get_all("x-api-key")]
        for value in headers.get_all("authorization"):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer":
                candidates.append(token.strip())
        found = None
        for candidate in candidates:
            if not candidate:
                continue
            digest = _digest(candidate)
            for name, key_digest in self._keys:
                # No early exit: the time taken does not depend on which key matched.
                if hmac.compare_digest(digest, key_digest) and found is None:
                    found = name
        return found

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or flow.is_replay or not self._keys:
            return
        # The admin page answers /admin only on the relay's own port (reverse mode); in regular mode
        # such a path belongs to whatever site the client asked for and the relay would route it.
        if isinstance(flow.client_conn.proxy_mode, ReverseMode) and is_admin_path(flow.request.path):
            return
        name = self.identify(flow.request.headers)
        if name is not None:
            flow.metadata[CLIENT_KEY_NAME] = name
            return
        given = "authorization" in flow.request.headers or "x-api-key" in flow.request.headers
        message = ("codex-relay: incorrect API key provided" if given else
                   "codex-relay: no API key provided; send one of the relay's client keys as "
                   "'Authorization: Bearer <key>' or 'x-api-key: <key>'")
        flow.response = http.Response.make(
            401, error_body(message, "invalid_api_key", "invalid_request_error"),
            {"content-type": "application/json", "www-authenticate": 'Bearer realm="codex-relay"'})
        flow.comment = "client auth: " + ("incorrect key" if given else "no key")
        # The route without its query string: a client may put a key there by mistake.
        log.debug("client %s: %s %s rejected: %s", flow.client_conn.peername, flow.request.method,
                  flow.request.path.partition("?")[0], "incorrect key" if given else "no key")
