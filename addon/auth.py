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
import logging

from mitmproxy import http
from mitmproxy.proxy.mode_specs import ReverseMode

from addon.egress import credentials_in
from addon.errors import CLIENT_KEY_NAME, error_response, fail_closed
from addon.guard.target import is_own_endpoint
from addon.refusal import RefusalSink, answered
from addon.services.clientkeys import ClientKeys

log = logging.getLogger("codex.auth")


class ClientAuth:
    """Checks each request's client key (``ClientKeys``, configured by ``codex_client_keys``)."""

    def __init__(self, refusals: RefusalSink | None = None, keys: ClientKeys | None = None) -> None:
        self.refusals = refusals or RefusalSink()
        self.keys = keys or ClientKeys()
        self._tunnels: dict[str, str] = {}  # client connection id -> key name of its authorised CONNECT

    def identify(self, headers: http.Headers) -> str | None:
        """The name of the client key these request headers carry, or None."""
        present = credentials_in(headers)
        candidates = [v.strip() for v in present.get("x-api-key", ())]
        for name in ("authorization", "proxy-authorization"):
            for value in present.get(name, ()):
                candidates.extend(_credentials(value))
        return self.keys.find(candidates)

    @fail_closed
    def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not self.keys.enabled:
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
        if answered(flow) or flow.is_replay or not self.keys.enabled:
            return
        if is_own_endpoint(flow.request.path, reverse=isinstance(flow.client_conn.proxy_mode, ReverseMode),
                           client_keys=True):
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
