"""The relay's idle watch: streams, and sockets' turns (``addon.wsrelay``), whose node has sent nothing for
``codex_idle_timeout`` are ended (they count against the node).

One timer for all of them, armed while anything streams: a stream ends at most a quarter of the timeout late.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from mitmproxy import http

from addon.inject import close_server
from addon.metering.call import Call

if TYPE_CHECKING:
    from addon.wsrelay import Sockets


class IdleWatch:
    """The streaming answers of the relay's calls, and the timer that looks at them (and at the sockets)."""

    def __init__(self, sockets: Sockets) -> None:
        self.sockets = sockets
        self.timeout = 300.0  # codex_idle_timeout, set by the relay's configure; 0: no limit
        self._streams: dict[str, tuple[http.HTTPFlow, Call]] = {}
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, flow: http.HTTPFlow, call: Call) -> None:
        """``flow``'s answer streams from now on (metered by ``call.meter``)."""
        self._streams[flow.id] = (flow, call)
        self.arm()

    def forget(self, flow: http.HTTPFlow) -> None:
        self._streams.pop(flow.id, None)

    @property
    def armed(self) -> bool:
        return self._timer is not None

    def arm(self) -> None:
        """Start the timer if something streams (or a socket's turn runs) and none is running."""
        if self._timer is None and (self._streams or self.sockets.turns_running) and self.timeout:
            # Checked a few times per timeout: a stream ends at most a quarter late.
            self._timer = asyncio.get_running_loop().call_later(min(self.timeout / 4, 5.0), self.check)

    def check(self) -> None:
        """One round (what the timer runs): end what went quiet, then arm again for what still streams."""
        self.stop()
        now = time.time()
        for flow, call in list(self._streams.values()):
            resp = flow.response
            last = (call.meter.last_chunk_at if call.meter else None) or (resp.timestamp_start if resp else now)
            if now - last >= self.timeout:
                call.relay_error = f"no bytes from the node for {self.timeout:g} s"
                del self._streams[flow.id]
                close_server(flow)
        if self.sockets.turns_running:
            self.sockets.watch_idle(now, self.timeout)
        self.arm()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def clear(self) -> None:
        """At shutdown: nothing streams any more."""
        self._streams.clear()
        self.stop()
