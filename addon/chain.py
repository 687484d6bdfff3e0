"""The relay's addons presented to mitmproxy as one.

For every event mitmproxy walks every addon (and each addon's ``addons``) for a method of the event's
name, and calls each one it finds on its own, building the event's arguments again for each: with the
relay's eleven addons that walk and those calls cost about a third of what the relay's own hooks do
per call. ``AddonChain`` looks each hook up once, when it is built, and runs the hooks of one event in
its addons' order, as mitmproxy would have: an async hook is awaited before the next one runs, and an
exception ends the event for the rest of the chain (mitmproxy's ``safecall`` did so for the script's
whole subtree). The addons stay ordinary mitmproxy addons, each testable on its own.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

# Every module that declares hooks, so that ``hooks.all_hooks`` lists them all when the chain is built.
import mitmproxy.addonmanager  # noqa: F401  (load)
import mitmproxy.log  # noqa: F401  (add_log)
import mitmproxy.proxy.layers  # noqa: F401  (http, tcp, udp, tls, websocket, dns, quic)
import mitmproxy.proxy.server_hooks  # noqa: F401
from mitmproxy import hooks
from mitmproxy.addonmanager import traverse

Hook = Callable[..., Any]


class AddonChain:
    """``addons`` (and their sub-addons) as one addon: each of its hooks calls theirs, in order."""

    name = "codex-relay"

    def __init__(self, addons: Sequence[object]) -> None:
        self.chained = tuple(traverse(addons))
        for event in hooks.all_hooks:
            found = [hook for addon in self.chained if callable(hook := getattr(addon, event, None))]
            if found:
                # One addon's hook is set as it is: nothing runs between mitmproxy and it.
                setattr(self, event, found[0] if len(found) == 1 else _in_order(tuple(found)))


def _in_order(found: tuple[Hook, ...]) -> Hook:
    def hook(*args: Any) -> Awaitable[None] | None:
        for i, each in enumerate(found):
            result = each(*args)
            if result is not None and inspect.isawaitable(result):
                return _rest(result, found[i + 1:], args)  # mitmproxy awaits it: the rest runs after
        return None

    if any(inspect.iscoroutinefunction(each) for each in found):
        # As an async hook of its own would: mitmproxy refuses it where it cannot await (a sync trigger).
        inspect.markcoroutinefunction(hook)
    return hook


async def _rest(pending: Awaitable[Any], found: tuple[Hook, ...], args: tuple[Any, ...]) -> None:
    await pending
    for each in found:
        result = each(*args)
        if result is not None and inspect.isawaitable(result):
            await result
