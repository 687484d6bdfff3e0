"""mitmproxy's "Streaming response from <host>." line, and mitmdump's line per WebSocket message, at debug
level while the relay runs.

The relay streams every answer it forwards (``addon.relay`` sets ``stream`` on each), so mitmproxy's
info line for a streamed answer is one line per call that says nothing the flow list and the database
do not. Writing it was not free: a line per call to a terminal or a pipe cost ~5 % of a short call's
CPU (docs/benchmarks.md). Demoted, not dropped: ``--set termlog_verbosity=debug`` shows it again. The same
holds for mitmdump's line per WebSocket message (``gate_hook``, used by ``addon.wsrelay``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

# mitmproxy's connection handler logs its layers' messages through the logger of its module.
SERVER_LOGGER = "mitmproxy.proxy.server"
STREAMING_LINE = "Streaming response from "  # mitmproxy.proxy.layers.http: HttpStream.start_response_stream


class _DemoteStreamingLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and isinstance(record.msg, str) and record.msg.startswith(STREAMING_LINE):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"  # handlers compare levelno
        return True


_DEMOTE = _DemoteStreamingLine()


def demote_streaming_line() -> None:
    logging.getLogger(SERVER_LOGGER).addFilter(_DEMOTE)  # once, however often called


def restore_streaming_line() -> None:
    logging.getLogger(SERVER_LOGGER).removeFilter(_DEMOTE)


# mitmdump's printer (mitmproxy.addons.dumper) writes one line per WebSocket message at the default
# flow_detail: a Codex turn is some hundred messages, so a line each would bury everything else.
WEBSOCKET_MESSAGE_HOOK = "websocket_message"


def gate_hook(addon: object, hook: str, shown: Callable[[], bool]) -> None:
    """From now on ``addon``'s ``hook`` runs only while ``shown()`` holds. mitmproxy looks a hook up by name on
    the addon at each event, so an attribute of the instance stands in for the class's method; ``ungate_hook``
    removes it."""
    method = getattr(type(addon), hook)

    def gated(*args: object) -> object:
        return method(addon, *args) if shown() else None

    setattr(addon, hook, gated)


def ungate_hook(addon: object, hook: str) -> None:
    vars(addon).pop(hook, None)
