"""mitmproxy's per-call "Streaming response from …" line and mitmdump's line per WebSocket message are at
debug level while the relay is loaded."""

from __future__ import annotations

import inspect
import logging

import pytest
from mitmproxy.proxy.layers.http import HttpStream
from mitmproxy.test import taddons

from addon.observe.loglines import SERVER_LOGGER, STREAMING_LINE
from addon.relay import Relay
from addon.services.runtime import Runtime


class _Lines(logging.Handler):
    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def handlers():
    """A handler at info (the terminal's default) and one at debug on mitmproxy's server logger."""
    logger = logging.getLogger(SERVER_LOGGER)
    info, debug = _Lines(logging.INFO), _Lines(logging.DEBUG)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(info)
    logger.addHandler(debug)
    yield info, debug
    logger.removeHandler(info)
    logger.removeHandler(debug)
    logger.setLevel(old_level)


def test_mitmproxy_still_words_its_streaming_line_as_the_filter_expects():
    # Another wording would pass the filter by and print a line per call again.
    assert f'Log(f"{STREAMING_LINE}{{' in inspect.getsource(HttpStream.start_response_stream)


def test_the_streaming_line_is_debug_while_the_relay_is_loaded_and_info_after(handlers):
    info, debug = handlers
    logger = logging.getLogger(SERVER_LOGGER)
    relay = Relay(Runtime())
    with taddons.context(relay):
        logger.info("Streaming response from api.example.")
        logger.info("client connect")  # anything else keeps its level
        assert [r.getMessage() for r in info.records] == ["client connect"]
        assert [(r.getMessage(), r.levelname) for r in debug.records] == [
            ("Streaming response from api.example.", "DEBUG"), ("client connect", "INFO")]
        info.records.clear()
        relay.done()  # mitmproxy's done at shutdown: the line is mitmproxy's own again
        logger.info("Streaming response from api.example.")
        assert [(r.getMessage(), r.levelname) for r in info.records] == [
            ("Streaming response from api.example.", "INFO")]


def test_the_relay_takes_the_call_lines_only_from_a_dumper_at_its_default():
    from mitmproxy import optmanager

    from addon.observe.loglines import take_call_lines

    def options(detail: int, dumper_filter: str | None = None) -> optmanager.OptManager:
        opts = optmanager.OptManager()
        opts.add_option("flow_detail", int, 1, "")
        opts.add_option("dumper_filter", str | None, None, "")
        opts.update(flow_detail=detail, dumper_filter=dumper_filter)
        return opts

    default = options(1)
    assert take_call_lines(default, dumper=object()) is True
    assert default.dumper_filter == "!(~comment '^call: ')"  # the dumper leaves the recorded calls out
    assert take_call_lines(options(1), dumper=None) is False  # mitmweb: no dumper
    assert take_call_lines(options(2), dumper=object()) is False  # the user asked for mitmdump's detail
    mine = options(1, "~u responses")
    assert take_call_lines(mine, dumper=object()) is False and mine.dumper_filter == "~u responses"


def test_mitmdump_prints_no_line_per_message_of_a_socket_the_relay_records():
    import io

    from mitmproxy.addons.dumper import Dumper
    from mitmproxy.proxy.layers.websocket import WebsocketMessageHook
    from mitmproxy.test import taddons, tflow

    from addon.observe.loglines import CALL_COMMENT, take_call_lines

    out = io.StringIO()
    dumper = Dumper(outfile=out)
    with taddons.context(dumper) as tctx:
        assert take_call_lines(tctx.options, dumper)
        flow = tflow.twebsocketflow()

        def message() -> str:
            tctx.master.addons.invoke_addon_sync(dumper, WebsocketMessageHook(flow))  # as mitmproxy dispatches
            line, _ = out.getvalue(), out.truncate(0)
            out.seek(0)
            return line

        assert "WebSocket" in message()  # a socket the relay does not record: mitmdump's own line
        flow.comment = f"{CALL_COMMENT}WebSocket to a"  # as addon.wsrelay marks the sockets it records
        assert message() == ""
