"""Key hygiene: no API key stays on a flow once its request has been sent.

The relay puts a node's key on ``flow.request`` in its ``request`` hook and mitmproxy sends the
request after that hook. Everything that keeps or shows flows — ``-w`` files (``save_stream_file``),
mitmweb, mitmdump's ``--flow-detail 2+`` output — reads them in the ``response`` / ``error`` hooks or
later, and those addons run after this script's addons. So once a request has gone out
(``responseheaders``, which only fires after that, or ``response`` / ``error``) this addon replaces
the ``Authorization``, ``x-api-key`` and ``Proxy-Authorization`` values with a masked form such as
``Bearer sk-…abcd`` (a ``CONNECT``'s once client auth has read it). Every flow is masked, not only
routed ones: in monitor mode the client's own header is the upstream key.

- A failed call that the relay retries is copied and replayed with the next node's key already set.
  mitmweb lists a replay from its ``requestheaders`` hook on, so the key is hidden there and put back
  in ``request`` (unless something set a new one meanwhile), just before mitmproxy sends it.
- Flows still waiting for their answer at shutdown are masked in ``done``, before ``-w`` writes them.

What remains: while a request waits for its response headers, the key is on that flow, and mitmweb
shows it (mitmproxy sends a request as its flow holds it after the last ``request`` hook, and mitmweb
lists that same object). A masked flow replayed from mitmweb
in monitor mode sends the masked value, not the key (in routed mode the relay sets the node's key).
"""

from __future__ import annotations

from mitmproxy import http

from addon.egress import credentials_in
from store.masking import mask_secret


def mask_credential(value: str) -> str:
    """A header value with its secret masked: ``Bearer <key>`` keeps its scheme."""
    scheme, sep, token = value.strip().partition(" ")
    if sep and token.strip() and scheme.isalpha():
        return f"{scheme} {mask_secret(token.strip())}"
    return mask_secret(value.strip())


def mask_headers(headers: http.Headers) -> list[tuple[str, list[str], list[str]]]:
    """Mask every credential header in place; returns (name, original values, masked values) of changed ones."""
    changed = []
    for name, values in credentials_in(headers).items():
        masked = [mask_credential(v) for v in values]
        if masked != values:
            headers.set_all(name, masked)
            changed.append((name, values, masked))
    return changed


class KeyHygiene:
    def __init__(self) -> None:
        # Flows whose request may still hold a key: masked in done() at the latest.
        self._unmasked: dict[str, http.HTTPFlow] = {}
        # Replays whose credentials are hidden between requestheaders and request.
        self._hidden: dict[str, list[tuple[str, list[str], list[str]]]] = {}
        # The request headers as responseheaders left them (a tuple: any change makes a new one), so the
        # response hook masks again only what changed since.
        self._masked: dict[str, tuple[tuple[bytes, bytes], ...]] = {}

    def http_connect(self, flow: http.HTTPFlow) -> None:
        # Client auth has read the CONNECT's Proxy-Authorization (a client key); nothing else needs it.
        self._mask(flow)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.is_replay != "request" or flow.response or flow.error:
            return
        hidden = mask_headers(flow.request.headers)
        if hidden:
            self._hidden[flow.id] = hidden

    def request(self, flow: http.HTTPFlow) -> None:
        hidden = self._hidden.pop(flow.id, None)
        if hidden:
            headers = flow.request.headers
            for name, original, masked in hidden:
                if headers.get_all(name) == masked:  # an addon that set a new key wins
                    headers.set_all(name, original)
        if flow.response or flow.error:
            return  # answered without going upstream: masked in responseheaders / response
        self._unmasked[flow.id] = flow

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # Only fires once the request is out (also emulated for a response set by an addon).
        self._mask(flow)
        self._masked[flow.id] = flow.request.headers.fields

    def response(self, flow: http.HTTPFlow) -> None:
        if self._masked.pop(flow.id, None) is not flow.request.headers.fields:
            self._mask(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._hidden.pop(flow.id, None)
        self._masked.pop(flow.id, None)
        self._mask(flow)

    def done(self) -> None:
        for flow in list(self._unmasked.values()):
            self._mask(flow)
        self._hidden.clear()
        self._masked.clear()

    def _mask(self, flow: http.HTTPFlow) -> None:
        self._unmasked.pop(flow.id, None)
        mask_headers(flow.request.headers)
