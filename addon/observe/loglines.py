"""mitmproxy's "Streaming response from <host>." line at debug level while the relay runs, and the relay's own
line per recorded call (a WebSocket's turns among them) in place of mitmdump's.

The relay streams every answer it forwards (``addon.relay`` sets ``stream`` on each), so mitmproxy's
info line for a streamed answer is one line per call that says nothing the flow list and the database
do not. Writing it was not free: a line per call to a terminal or a pipe cost ~5 % of a short call's
CPU (docs/benchmarks.md). Demoted, not dropped: ``--set termlog_verbosity=debug`` shows it again. The same
holds for mitmdump's line per WebSocket message (``gate_hook``, used by ``addon.wsrelay``).
"""

from __future__ import annotations

import logging

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


# Comments of flows the relay recorded begin so (addon.relay): mitmdump leaves them to the relay's own line.
CALL_COMMENT = "call: "
_DUMPER_SKIPS_CALLS = f"!(~comment '^{CALL_COMMENT}')"


def take_call_lines(options: object, dumper: object | None) -> bool:
    """Whether the relay writes a line per recorded call instead of mitmdump's dumper: the dumper's two lines
    name the node's URL but say nothing of the call, and "(content missing)" for every streamed answer (the
    relay keeps no body). Only at the dumper's default detail and with no filter of the user's: then the
    dumper is given a filter that leaves recorded calls out."""
    if dumper is None or getattr(options, "flow_detail", None) != 1 or getattr(options, "dumper_filter", None):
        return False
    options.update(dumper_filter=_DUMPER_SKIPS_CALLS)  # type: ignore[attr-defined]
    return True
