"""mitmproxy's hook dispatch with each event's hooks looked up once, not per event.

For every event (two per WebSocket message: ``websocket_message``, then ``update``) mitmproxy walks all of
its ~35 addons and their sub-addons (``traverse``), asks each for a method of the event's name and enters a
``safecall`` block per addon, though one or two addons have the hook: that walk was about half of bare
mitmdump's CPU per WebSocket message, more than all the relay's own work per message (docs/benchmarks.md).
``HookCache`` keeps, per event name, the hooks of each addon that has one — found by mitmproxy's own
``_iter_hooks``, in its order — and forgets them whenever the addon tree changes: an addon added, removed or
registered (scripts loading and reloading do that), or options changed (``scripts`` reordered). Each addon's
hooks still run in order inside its own ``safecall``, an async hook is awaited before the next runs,
``AddonHalt`` ends the event. What it does not see: a hook method set on an addon object after the addon was
added (no mitmproxy addon does that); ``codex_hook_cache=false`` leaves mitmproxy's dispatch as it is.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from mitmproxy import ctx, exceptions, hooks
from mitmproxy.addonmanager import AddonManager, safecall

Hook = Callable[..., Any]
# What is wrapped so that a change of the addon tree forgets the hooks found.
_CHANGES = ("add", "remove", "register", "clear")


class HookCache:
    """The addon: ``codex_hook_cache`` installs ``CachedDispatch`` on the master's addon manager when running."""

    def load(self, loader) -> None:
        loader.add_option("codex_hook_cache", bool, True,
                          "Dispatch mitmproxy's events to the hooks of its addons found once per event name (found "
                          "again whenever an addon is added or removed) instead of walking every addon for every "
                          "event: about half of mitmproxy's CPU per WebSocket message. false: mitmproxy's own "
                          "dispatch, e.g. for a script that sets hook methods on its addons while running.")

    def running(self) -> None:
        if ctx.options.codex_hook_cache:
            CachedDispatch(ctx.master.addons).install()


class CachedDispatch:
    """``AddonManager.trigger_event`` with each event's hooks found once, until the addon tree changes."""

    def __init__(self, manager: AddonManager) -> None:
        self.manager = manager
        self._found: dict[str, tuple[tuple[Hook, ...], ...]] = {}  # event name -> per addon with it, its hooks
        self._walk = manager.trigger_event  # mitmproxy's own, for what the cache cannot hold

    def install(self) -> None:
        manager = self.manager
        if isinstance(getattr(manager.trigger_event, "__self__", None), CachedDispatch):
            return  # installed already
        if not all(hasattr(manager, name) for name in (*_CHANGES, "chain", "_iter_hooks")):
            return  # another mitmproxy than this was written for: its own dispatch stays
        for name in _CHANGES:
            setattr(manager, name, self._forgetting(getattr(manager, name)))
        manager.trigger = self._configuring(manager.trigger)  # type: ignore[method-assign,assignment]
        manager.trigger_event = self.trigger_event  # type: ignore[method-assign]

    def _forgetting(self, change: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(change)
        def changed(*args: Any, **kwargs: Any) -> Any:
            try:
                return change(*args, **kwargs)
            finally:
                self._found.clear()
        return changed

    def _configuring(self, trigger: Callable[[hooks.Hook], None]) -> Callable[[hooks.Hook], None]:
        """mitmproxy's ``trigger``, forgetting the hooks found after options changed: ``scripts`` reordered changes
        the tree with no addon added or removed."""
        @functools.wraps(trigger)
        def triggered(event: hooks.Hook) -> None:
            try:
                trigger(event)
            finally:
                if isinstance(event, hooks.ConfigureHook):
                    self._found.clear()
        return triggered

    async def trigger_event(self, event: hooks.Hook) -> None:
        found = self._found.get(event.name)
        if found is None:
            found = self._find(event)
            if found is None:  # an addon's attribute of the event's name is no hook: mitmproxy's walk says so
                await self._walk(event)
                return
        for each in found:  # as mitmproxy's: a safecall per addon, its hooks (its sub-addons') in order
            try:
                with safecall():
                    for hook in each:
                        result = hook(*event.args())
                        if result is not None and inspect.isawaitable(result):
                            await result
            except exceptions.AddonHalt:
                return

    def _find(self, event: hooks.Hook) -> tuple[tuple[Hook, ...], ...] | None:
        manager = self.manager
        try:
            found = tuple(each for addon in manager.chain
                          if (each := tuple(hook for _, hook in manager._iter_hooks(addon, event))))
        except exceptions.AddonManagerError:
            return None
        self._found[event.name] = found
        return found
