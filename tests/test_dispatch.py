"""The hook cache: mitmproxy's events reach the same hooks in the same order as mitmproxy's own dispatch, also
after addons come and go and a script reloads."""

from __future__ import annotations

import asyncio

from mitmproxy import exceptions, hooks
from mitmproxy.addons.script import ScriptLoader
from mitmproxy.test import taddons

from addon.dispatch import CachedDispatch, HookCache
from tests.support.relayharness import in_loop


class Tagged:
    def __init__(self, log: list[str], tag: str) -> None:
        self.log, self.tag = log, tag
        self.name = tag  # mitmproxy's addon name: one per addon

    def request(self, flow: object) -> None:
        self.log.append(f"{self.tag} request {flow}")

    def response(self, flow: object) -> None:
        self.log.append(f"{self.tag} response {flow}")


class Awaited(Tagged):
    async def request(self, flow: object) -> None:
        await asyncio.sleep(0)  # a real suspension: the next hook must wait for it
        self.log.append(f"{self.tag} request {flow}")


class Failing(Tagged):
    def request(self, flow: object) -> None:
        self.log.append(f"{self.tag} fails")
        raise RuntimeError("boom")


class Halting(Tagged):
    def response(self, flow: object) -> None:
        self.log.append(f"{self.tag} halts")
        raise exceptions.AddonHalt


class Parent(Tagged):
    def __init__(self, log: list[str], tag: str) -> None:
        super().__init__(log, tag)
        # a failing sub-addon ends its parent's turn (the rest of its subtree), not the event
        self.addons = [Tagged(log, f"{tag}.child"), Failing(log, f"{tag}.failing"), Tagged(log, f"{tag}.skipped")]


def _tree(log: list[str]) -> list[object]:
    return [Tagged(log, "a"), Awaited(log, "b"), Parent(log, "p"), Failing(log, "f"), Halting(log, "h"),
            Tagged(log, "z"), object()]


async def _events(tctx: taddons.context, names: tuple[str, ...] = ("request", "response", "error")) -> None:
    for name in names:
        await tctx.master.addons.trigger_event(hooks.all_hooks[name]("f"))


@in_loop
async def test_every_event_reaches_the_hooks_mitmproxy_would_call_in_its_order():
    logs: list[list[str]] = []
    for cached in (False, True):
        log: list[str] = []
        with taddons.context(*_tree(log), loadcore=False) as tctx:
            if cached:
                CachedDispatch(tctx.master.addons).install()
            await _events(tctx)
            await _events(tctx)  # the second time from the cache
        logs.append(log)
    assert logs[1] == logs[0]
    assert logs[0][:8] == ["a request f", "b request f", "p request f", "p.child request f", "p.failing fails",
                           "f fails", "h request f", "z request f"]
    assert "a response f" in logs[0] and "z response f" not in logs[0]  # AddonHalt ended the event


@in_loop
async def test_an_addon_added_or_removed_meanwhile_is_seen_at_the_next_event():
    log: list[str] = []
    first = Tagged(log, "first")
    with taddons.context(first, loadcore=False) as tctx:
        CachedDispatch(tctx.master.addons).install()
        await _events(tctx)
        later = Tagged(log, "later")
        tctx.master.addons.add(later)
        await _events(tctx)
        tctx.master.addons.remove(first)
        await _events(tctx)
    assert log == ["first request f", "first response f",
                   "first request f", "later request f", "first response f", "later response f",
                   "later request f", "later response f"]


@in_loop
async def test_a_reloaded_script_is_dispatched_to_as_it_now_is(tmp_path):
    script = tmp_path / "script.py"
    script.write_text("seen = []\ndef request(flow):\n    seen.append(('old', flow))\n")
    loader = ScriptLoader()
    with taddons.context(loader) as tctx:
        tctx.configure(loader, scripts=[str(script)])
        CachedDispatch(tctx.master.addons).install()
        (sc,) = loader.addons
        if sc.ns is None:  # loaded by its watcher, later: at once here
            sc.loadscript()
        await _events(tctx, ("request",))
        old = sc.ns
        assert old.seen == [("old", "f")]
        script.write_text("seen = []\ndef response(flow):\n    seen.append(('new', flow))\n")
        sc.loadscript()  # what a reload does
        await _events(tctx, ("request", "response"))
        assert sc.ns.seen == [("new", "f")] and old.seen == [("old", "f")]  # the old module's hook is gone


def test_the_relay_installs_it_when_running_unless_told_not_to():
    for enabled in (True, False):
        cache = HookCache()
        with taddons.context(cache) as tctx:
            tctx.configure(cache, codex_hook_cache=enabled)
            cache.running()
            cache.running()  # once is enough
            method = tctx.master.addons.trigger_event
            assert isinstance(getattr(method, "__self__", None), CachedDispatch) is enabled
            if enabled:
                assert method.__self__._walk.__self__ is tctx.master.addons  # mitmproxy's own under it


@in_loop
async def test_scripts_reordered_run_in_their_new_order(tmp_path):
    order: list[str] = []
    paths = []
    for tag in ("a", "b"):
        path = tmp_path / f"{tag}.py"
        path.write_text(f"def request(flow):\n    flow.append({tag!r})\n")
        paths.append(str(path))
    loader = ScriptLoader()
    with taddons.context(loader) as tctx:
        tctx.configure(loader, scripts=paths)
        for sc in loader.addons:
            if sc.ns is None:  # loaded by its watcher, later: at once here
                sc.loadscript()
        CachedDispatch(tctx.master.addons).install()
        await tctx.master.addons.trigger_event(hooks.all_hooks["request"](order))
        tctx.master.options.update(scripts=paths[::-1])  # no addon added or removed: only their order changes
        await tctx.master.addons.trigger_event(hooks.all_hooks["request"](order))
    assert order == ["a", "b", "b", "a"]
