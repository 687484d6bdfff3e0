"""mitmproxy's "Streaming response from <host>." line, at debug level while the relay runs.

The relay streams every answer it forwards (``addon.relay`` sets ``stream`` on each), so mitmproxy's
info line for a streamed answer is one line per call that says nothing the flow list and the database
do not. Writing it was not free: a line per call to a terminal or a pipe cost ~5 % of a short call's
CPU (docs/benchmarks.md). Demoted, not dropped: ``--set termlog_verbosity=debug`` shows it again.
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
